"""Bad requests get a 4xx with an OpenAI-style error body naming the problem, and the server
keeps serving: after all of them, a good request still returns the reference output."""

import json

import pytest

pytestmark = pytest.mark.slow
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = "hello " * 600  # 600+ tokens: past the test server's 512-token context

# (id, path, body: a dict sent as JSON or raw bytes, status, error param, error code)
CASES = [
    ("malformed-json", COMPLETIONS, b'{"prompt": "Hi", ', 400, None, None),
    ("not-utf8", COMPLETIONS, b'\xff\xfe{}', 400, None, None),
    ("body-not-object", COMPLETIONS, b"[1, 2]", 400, None, None),
    ("missing-prompt", COMPLETIONS, {"max_tokens": 4}, 400, "prompt", None),
    ("prompt-wrong-type", COMPLETIONS, {"prompt": 42}, 400, "prompt", None),
    ("temperature-string", COMPLETIONS, {"prompt": "Hi", "temperature": "hot"}, 400, "temperature", None),
    ("max-tokens-float", COMPLETIONS, {"prompt": "Hi", "max_tokens": 4.5}, 400, "max_tokens", None),
    ("stream-not-bool", COMPLETIONS, {"prompt": "Hi", "stream": "yes"}, 400, "stream", None),
    ("unknown-field", COMPLETIONS, {"prompt": "Hi", "max_token": 4}, 400, "max_token", None),
    ("unsupported-field", CHAT, {"messages": MESSAGES, "tools": []}, 400, "tools", None),
    ("unknown-model", COMPLETIONS, {"prompt": "Hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("unknown-model-chat", CHAT, {"messages": MESSAGES, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("empty-prompt", COMPLETIONS, {"prompt": ""}, 400, None, None),
    ("empty-token-prompt", COMPLETIONS, {"prompt": []}, 400, None, None),
    ("token-out-of-vocab", COMPLETIONS, {"prompt": [1, 10**9]}, 400, None, None),
    ("max-tokens-zero", COMPLETIONS, {"prompt": "Hi", "max_tokens": 0}, 400, None, None),
    ("max-tokens-negative", CHAT, {"messages": MESSAGES, "max_tokens": -1}, 400, None, None),
    ("max-tokens-past-context", COMPLETIONS, {"prompt": "Hi", "max_tokens": 100_000}, 400, None, None),
    ("prompt-past-context", COMPLETIONS, {"prompt": LONG_PROMPT, "max_tokens": 1}, 400, None, None),
    ("chat-past-context", CHAT, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, None, None),
    ("n-too-large", COMPLETIONS, {"prompt": "Hi", "n": 1000}, 400, "n", None),
    ("n-zero", COMPLETIONS, {"prompt": "Hi", "n": 0}, 400, None, None),
    ("temperature-negative", COMPLETIONS, {"prompt": "Hi", "temperature": -1.0}, 400, None, None),
    ("top-p-zero", COMPLETIONS, {"prompt": "Hi", "top_p": 0.0}, 400, None, None),
    ("presence-penalty", COMPLETIONS, {"prompt": "Hi", "presence_penalty": 3.0}, 400, None, None),
    ("logprobs-too-many", COMPLETIONS, {"prompt": "Hi", "logprobs": 50}, 400, None, None),
    ("cache-ttl-without-host-tier", CHAT, {"messages": MESSAGES, "cache_ttl": 60}, 400, "cache_ttl", None),
    ("cache-ttl-negative", COMPLETIONS, {"prompt": "Hi", "cache_ttl": -1.0}, 400, None, None),
    ("top-logprobs-without-logprobs", CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("stop-empty-string", COMPLETIONS, {"prompt": "Hi", "stop": [""]}, 400, None, None),
    ("stream-options-without-stream", COMPLETIONS,
     {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages", None),
    ("message-without-role", CHAT, {"messages": [{"content": "Hi"}]}, 400, "messages", None),
    ("message-image-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", None),
    ("body-too-large", COMPLETIONS, {"prompt": "a" * (1 << 20)}, 413, None, "request_too_large"),
]


def send(http, path: str, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


def assert_openai_error(response, status: int, param, code) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code


@pytest.mark.parametrize("path, body, status, param, code", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_request(server, path, body, status, param, code):
    with server.http() as http:
        assert_openai_error(send(http, path, body), status, param, code)


def test_body_too_large_while_streaming_in(server):
    """A chunked body (no Content-Length) is cut off once it passes the limit."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * (64 << 10)
        yield b'"}'

    with server.http() as http:
        response = http.post(COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"})
    assert_openai_error(response, 413, None, "request_too_large")


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("GET", COMPLETIONS, 405)])
def test_unknown_route(server, method, path, status):
    with server.http() as http:
        response = http.request(method, path)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_serves_after_bad_requests(server, references, reference_requests):
    prompt, params = reference_requests["concurrent-2"]
    with server.http() as http:
        for _, path, body, status, _, _ in CASES:
            assert send(http, path, body).status_code == status
        good = {"model": server.model, "prompt": prompt, "max_tokens": params.max_tokens, "temperature": 0.0,
                "ignore_eos": True}
        response = http.post(COMPLETIONS, json=good)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == references["concurrent-2"].outputs[0].text
    server.wait_idle()
