"""A hostile or unlucky client's requests, each answered with a 4xx and an OpenAI-shaped error
body (never a 500, never served): broken or deeply nested JSON, lone surrogates, wrong types,
missing fields, values out of range, too much work for one request (prompts, prompt tokens,
body bytes, n, max_tokens, stop strings), bad chat messages. After all of them, one normal
request is served and every KV block is free again.

The server is conftest's in-process tiny model (SmolLM2's tokenizer, 512-token context) with
LIMITS: 8 prompts and 2048 prompt tokens per request, the default 1 MiB body and JSON depth 64.
"""

import json

import pytest

from .conftest import LIMITS

pytestmark = pytest.mark.slow
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


def chat(**fields) -> dict:
    return {"messages": HI, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"prompt": "Hi", "max_tokens": 2, **fields}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (id, path, body: a dict sent as JSON or raw bytes, headers, status, a fragment of the error message)
CASES = [
    # what a hostile client sent kiln serve 500s with, or got served
    ("json-nested-2000", COMPLETIONS, b'{"prompt": ' + nested(2000) + b"}", JSON, 400, "nests arrays and objects"),
    ("json-nested-2000-chat", CHAT, b'{"messages": [{"role": "user", "content": "Hi", "x": ' + nested(2000) + b"}]}",
     JSON, 400, "max_json_depth"),
    ("json-nested-objects", COMPLETIONS, b'{"a":' * 3000 + b"1" + b"}" * 3000, JSON, 400, "max_json_depth"),
    ("json-unclosed-brackets", COMPLETIONS, b"[" * 100_000, JSON, 400, "max_json_depth"),
    ("lone-surrogate-prompt", COMPLETIONS, b'{"prompt": "\\ud800", "max_tokens": 2}', JSON, 400, "surrogate"),
    ("lone-low-surrogate-chat", CHAT, b'{"messages": [{"role": "user", "content": "a\\udc00b"}]}', JSON, 400,
     "surrogate"),
    ("reversed-surrogate-pair", COMPLETIONS, b'{"prompt": "\\ude00\\ud83d"}', JSON, 400, "surrogate"),
    ("lone-surrogate-model", COMPLETIONS, b'{"prompt": "Hi", "model": "\\ud800"}', JSON, 400, "surrogate"),
    ("surrogate-utf8-bytes", COMPLETIONS, b'{"prompt": "\xed\xa0\x80"}', JSON, 400, "not valid JSON"),
    ("overlong-utf8", COMPLETIONS, b'{"prompt": "\xc0\xaf"}', JSON, 400, "not valid JSON"),
    ("content-null", CHAT, chat(messages=[{"role": "user", "content": None}]), JSON, 400, "messages[0].content"),
    ("assistant-content-null", CHAT, chat(messages=[{"role": "assistant", "content": None, "tool_calls": []}, *HI]),
     JSON, 400, "messages[0].content"),
    ("unknown-role", CHAT, chat(messages=[{"role": "wizard", "content": "Hi"}]), JSON, 400, "messages[0].role"),
    ("tool-without-call-id", CHAT, chat(messages=[*HI, {"role": "tool", "content": "42"}]), JSON, 400,
     "messages[1].tool_call_id"),
    ("5000-prompts", COMPLETIONS, completion(prompt=["Hi"] * 5000), JSON, 400, "max_prompts"),
    ("too-many-token-prompts", COMPLETIONS, completion(prompt=[[1, 2]] * (LIMITS.max_prompts + 1)), JSON, 400,
     "max_prompts"),
    ("too-many-prompt-tokens", COMPLETIONS, completion(prompt=[[1] * 300] * LIMITS.max_prompts), JSON, 400,
     "max_prompt_tokens"),
    ("too-many-chat-tokens", CHAT, chat(messages=[{"role": "user", "content": "hello " * 2100}]), JSON, 400,
     "max_prompt_tokens"),
    ("body-too-large", COMPLETIONS, completion(prompt="a" * LIMITS.max_body_bytes), JSON, 413, "max_body_bytes"),
    # not JSON, or not sent as JSON
    ("malformed-json", COMPLETIONS, b'{"prompt": "Hi", ', JSON, 400, "not valid JSON"),
    ("not-json", COMPLETIONS, b"prompt=Hi", JSON, 400, "not valid JSON"),
    ("empty-body", COMPLETIONS, b"", JSON, 400, "not valid JSON"),
    ("not-utf8", CHAT, b"\xff\xfe{}", JSON, 400, "not valid JSON"),
    ("nan", COMPLETIONS, b'{"prompt": "Hi", "temperature": NaN}', JSON, 400, "NaN is not a JSON value"),
    ("infinity", CHAT, b'{"messages": [], "top_p": Infinity}', JSON, 400, "Infinity is not a JSON value"),
    ("body-array", COMPLETIONS, b'["Hi"]', JSON, 400, "must be a JSON object"),
    ("body-null", CHAT, b"null", JSON, 400, "must be a JSON object"),
    ("content-type-text", COMPLETIONS, completion(), {"Content-Type": "text/plain"}, 415, "application/json"),
    ("content-type-form", CHAT, chat(), {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "application/json"),
    # missing fields, wrong types, unknown fields
    ("missing-prompt", COMPLETIONS, {"max_tokens": 2}, JSON, 400, "`prompt` is required"),
    ("missing-messages", CHAT, {"max_tokens": 2}, JSON, 400, "`messages` is required"),
    ("prompt-number", COMPLETIONS, completion(prompt=42), JSON, 400, "invalid `prompt`"),
    ("prompt-mixed-list", COMPLETIONS, completion(prompt=["a", 1]), JSON, 400, "invalid `prompt"),
    ("prompt-float-ids", COMPLETIONS, completion(prompt=[1.5, 2.0]), JSON, 400, "invalid `prompt"),
    ("temperature-string", COMPLETIONS, completion(temperature="hot"), JSON, 400, "invalid `temperature`"),
    ("max-tokens-float", COMPLETIONS, completion(max_tokens=4.5), JSON, 400, "invalid `max_tokens`"),
    ("stream-string", CHAT, chat(stream="yes"), JSON, 400, "invalid `stream`"),
    ("ignore-eos-string", COMPLETIONS, completion(ignore_eos="true"), JSON, 400, "invalid `ignore_eos`"),
    ("model-number", COMPLETIONS, completion(model=7), JSON, 400, "invalid `model`"),
    ("stop-number", COMPLETIONS, completion(stop=5), JSON, 400, "invalid `stop`"),
    ("unknown-field", COMPLETIONS, completion(max_token=4), JSON, 400, "unknown or unsupported field `max_token`"),
    ("tool-without-function", CHAT, chat(tools=[{"type": "function"}]), JSON, 400, "`tools[0].function` is required"),
    ("logit-bias-bad-keys", COMPLETIONS, completion(logit_bias={"not-a-token": 5, "-1": 200}), JSON, 400,
     "`logit_bias`"),
    ("stream-options-unknown-key", CHAT, chat(stream=True, stream_options={"include_usage": True, "x": 1}), JSON,
     400, "stream_options.x"),
    ("stream-options-without-stream", COMPLETIONS, completion(stream_options={"include_usage": True}), JSON, 400,
     "only allowed with stream"),
    ("unknown-model", COMPLETIONS, completion(model="gpt-4"), JSON, 404, "does not exist"),
    # values out of range
    ("temperature-negative", COMPLETIONS, completion(temperature=-1.0), JSON, 400, "temperature"),
    ("temperature-overflow", COMPLETIONS, b'{"prompt": "Hi", "temperature": 1e400}', JSON, 400, "temperature"),
    ("top-p-above-one", CHAT, chat(top_p=1.5), JSON, 400, "top_p"),
    ("top-k-negative", COMPLETIONS, completion(top_k=-5), JSON, 400, "top_k"),
    ("min-p-above-one", COMPLETIONS, completion(min_p=2.0), JSON, 400, "min_p"),
    ("presence-penalty", COMPLETIONS, completion(presence_penalty=3.0), JSON, 400, "presence_penalty"),
    ("frequency-penalty", CHAT, chat(frequency_penalty=-2.5), JSON, 400, "frequency_penalty"),
    ("repetition-penalty-zero", COMPLETIONS, completion(repetition_penalty=0.0), JSON, 400, "repetition_penalty"),
    ("seed-huge", COMPLETIONS, completion(seed=2**64), JSON, 400, "seed"),
    ("seed-negative", COMPLETIONS, completion(seed=-1), JSON, 400, "seed"),
    ("n-huge", COMPLETIONS, completion(n=10**6), JSON, 400, "n must be at most"),
    ("n-zero", CHAT, chat(n=0), JSON, 400, "n must be"),
    ("max-tokens-zero", COMPLETIONS, completion(max_tokens=0), JSON, 400, "max_tokens"),
    ("max-tokens-negative", CHAT, chat(max_tokens=-1), JSON, 400, "max_tokens"),
    ("max-tokens-huge", COMPLETIONS, completion(max_tokens=10**30), JSON, 400, "context"),
    ("max-completion-tokens-huge", CHAT, chat(max_completion_tokens=2**62), JSON, 400, "context"),
    ("min-tokens-above-max", COMPLETIONS, completion(min_tokens=5, max_tokens=2), JSON, 400, "min_tokens"),
    ("logprobs-too-many", COMPLETIONS, completion(logprobs=21), JSON, 400, "logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), JSON, 400, "top_logprobs needs logprobs"),
    ("top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=100), JSON, 400, "logprobs"),
    ("stop-too-many", COMPLETIONS, completion(stop=["x"] * 17), JSON, 400, "stop has 17 strings"),
    ("stop-empty-string", COMPLETIONS, completion(stop=[""]), JSON, 400, "stop"),
    # prompts the model cannot take
    ("prompt-empty", COMPLETIONS, completion(prompt=""), JSON, 400, "empty"),
    ("prompt-empty-ids", COMPLETIONS, completion(prompt=[]), JSON, 400, "empty"),
    ("token-id-out-of-vocab", COMPLETIONS, completion(prompt=[1, 10**9]), JSON, 400, "token ids must be in"),
    ("token-id-negative", COMPLETIONS, completion(prompt=[-1]), JSON, 400, "token ids must be in"),
    ("token-id-huge", COMPLETIONS, completion(prompt=[2**70]), JSON, 400, "token ids must be in"),
    ("prompt-past-context", COMPLETIONS, completion(prompt=[1] * 600), JSON, 400, "context"),
    # bad chat messages
    ("messages-empty", CHAT, chat(messages=[]), JSON, 400, "messages"),
    ("messages-string", CHAT, chat(messages="Hi"), JSON, 400, "messages"),
    ("message-not-object", CHAT, chat(messages=["Hi"]), JSON, 400, "messages[0]"),
    ("message-without-role", CHAT, chat(messages=[{"content": "Hi"}]), JSON, 400, "messages[0].role"),
    ("message-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), JSON, 400, "messages[0].content"),
    ("message-text-part-number", CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
     JSON, 400, "messages[0].content"),
    ("message-name-number", CHAT, chat(messages=[{"role": "user", "content": "Hi", "name": 5}]), JSON, 400,
     "messages[0].name"),
]


def send(http, path: str, body, headers: dict):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers=headers)


def assert_openai_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"], error["message"]


def test_probe_has_enough_cases():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("path, body, headers, status, fragment", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_request(tiny_server, path, body, headers, status, fragment):
    with tiny_server.http() as http:
        assert_openai_error(send(http, path, body, headers), status, fragment)


def test_json_depth_limit_is_exact(tiny_server):
    """A body nested exactly as deep as allowed is served (a chat message's extra key carries the
    nesting); one level more is refused."""
    def body(depth: int) -> bytes:  # {"messages": [{...}]} is 3 deep before the extra key
        message = b'{"role": "user", "content": "Hi", "meta": ' + nested(depth - 3) + b"}"
        return b'{"max_tokens": 1, "messages": [' + message + b"]}"

    with tiny_server.http() as http:
        assert send(http, CHAT, body(LIMITS.max_json_depth), JSON).status_code == 200
        assert_openai_error(send(http, CHAT, body(LIMITS.max_json_depth + 1), JSON), 400, "max_json_depth")


def test_served_after_the_probe(tiny_server):
    """Every KV block is free after the probe, and a normal request is served."""
    with tiny_server.http() as http:
        for _, path, body, headers, status, _ in CASES:
            assert send(http, path, body, headers).status_code == status
        tiny_server.wait_idle()
        response = http.post(COMPLETIONS, json={"model": tiny_server.model, "prompt": "The capital of France is",
                                                "max_tokens": 3, "temperature": 0.0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").status_code == 200
    tiny_server.wait_idle()
