"""OpenAI request fields map onto SamplingParams as the OpenAI API defines them (no model
needed): defaults, null meaning default, chat's token-limit and logprobs fields, prompt forms;
chat messages are checked; a body is checked before it is parsed (nesting depth, NaN, lone
surrogates); request limits and their `kiln serve` flags."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.cli import build_parser
from kiln.errors import KilnError
from kiln.runtime.openai_protocol import (
    MAX_STOP,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    RequestLimits,
    decode_json,
    json_depth,
    parse_request,
)
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server import DRAIN_TIMEOUT_S

HI = [{"role": "user", "content": "Hi"}]


def test_every_completion_field_reaches_sampling_params():
    request = parse_request(CompletionRequest, {
        "model": "m", "prompt": "Hi", "n": 3, "temperature": 0.7, "top_p": 0.9, "stop": ["\n", "END"], "seed": 7,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "max_tokens": 33, "logprobs": 4, "top_k": 40,
        "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True, "min_tokens": 5, "user": "u"})
    assert request.sampling_params() == SamplingParams(
        n=3, temperature=0.7, top_p=0.9, stop=("\n", "END"), seed=7, presence_penalty=0.5, frequency_penalty=-0.5,
        max_tokens=33, logprobs=4, top_k=40, min_p=0.1, repetition_penalty=1.2, ignore_eos=True, min_tokens=5)


def test_defaults_and_nulls():
    plain = parse_request(CompletionRequest, {"prompt": "Hi"}).sampling_params()
    nulls = parse_request(CompletionRequest, {"prompt": "Hi", "temperature": None, "stop": None, "n": None,
                                              "seed": None, "logprobs": None}).sampling_params()
    assert plain == nulls == SamplingParams(max_tokens=16)  # OpenAI's completions default
    assert parse_request(ChatCompletionRequest, {"messages": HI}).sampling_params() == SamplingParams(max_tokens=None)


def test_chat_token_limit_and_logprobs():
    def params(**fields):
        return parse_request(ChatCompletionRequest, {"messages": HI, **fields}).sampling_params()

    assert params(max_tokens=5).max_tokens == 5
    assert params(max_tokens=5, max_completion_tokens=9).max_tokens == 9
    assert params(logprobs=True).logprobs == 0
    assert params(logprobs=True, top_logprobs=3).logprobs == 3
    assert params(logprobs=False).logprobs is None
    assert params(stop="x").stop == ("x",)


@pytest.mark.parametrize("prompt, expected", [
    ("Hi", ["Hi"]), ([5, 6], [[5, 6]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]]), ([], [[]])])
def test_prompt_forms(prompt, expected):
    assert parse_request(CompletionRequest, {"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "temperature": "1"}, "temperature"),  # no string-to-number coercion
    ({"prompt": "Hi", "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": "Hi", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": "Hi", "echo": True}, "echo"),
])
def test_strict_types(body, param):
    with pytest.raises(APIError) as info:
        parse_request(CompletionRequest, body)
    assert info.value.status == 400 and info.value.param == param


def depth(value) -> int:
    """Reference nesting depth of a decoded JSON value (recursive; fine for test sizes)."""
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='[]{}"\\\\ab,:\n\u00e9\U0001F600'),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\\\a'), children,
                                                                      max_size=4),
    max_leaves=40)


@settings(max_examples=150, deadline=None)
@given(json_values, st.booleans())
def test_json_depth_equals_the_parsed_depth(value, ensure_ascii):
    """Brackets, quotes and backslashes inside strings (keys too) never count."""
    assert json_depth(json.dumps(value, ensure_ascii=ensure_ascii).encode()) == depth(value)


@pytest.mark.parametrize("raw, depth_", [(b"[" * 5000, 5000), (b"[" * 3 + b"]" * 3 + b"[[]]", 3), (b'"[[["', 0),
                                         (b'{"a": "\\\\", "b": [[1]]}', 3), (b'{"a": "\\\\\\"[[", "b": []}', 2)])
def test_json_depth_of_malformed_and_escaped_text(raw, depth_):
    assert json_depth(raw) == depth_


def test_decode_json_limits_depth_without_recursing():
    assert decode_json(b"[" * 64 + b"]" * 64, max_depth=64) == eval("[" * 64 + "]" * 64)
    for raw in (b"[" * 65 + b"]" * 65, b"[" * 100_000, b'{"a":' * 10_000):
        with pytest.raises(APIError, match="nests arrays and objects .* deep; the server accepts at most 64") as info:
            decode_json(raw, max_depth=64)
        assert info.value.status == 400


@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "\\ud800"}', "unpaired UTF-16 surrogate"), (b'{"a": "\\udfff\\ud800"}', "unpaired UTF-16 surrogate"),
    (b'{"t": NaN}', "NaN is not a JSON value"), (b'{"t": -Infinity}', "Infinity is not a JSON value"),
    (b'"\xed\xa0\x80"', "not valid JSON"), (b"\xff", "not valid JSON"), (b"", "not valid JSON"), (b"{", "not valid JSON")])
def test_decode_json_rejects(raw, message):
    with pytest.raises(APIError, match=message) as info:
        decode_json(raw, max_depth=64)
    assert info.value.status == 400


def test_decode_json_keeps_surrogate_pairs():
    assert decode_json(b'{"prompt": "\\ud83d\\ude00 \\u00e9"}', max_depth=64) == {"prompt": "\U0001F600 \u00e9"}


def test_request_limits():
    limits = RequestLimits(max_prompts=2, max_prompt_tokens=5)
    limits.check_prompt_count(2)
    limits.check_prompt_tokens([[1, 2], [3, 4, 5]], "prompt")
    with pytest.raises(APIError, match="at most 2 .*max_prompts") as info:
        limits.check_prompt_count(3)
    assert info.value.param == "prompt"
    with pytest.raises(APIError, match="has 6 prompt tokens; a request may have at most 5 .*max_prompt_tokens") as info:
        limits.check_prompt_tokens([[1] * 6], "messages")
    assert info.value.param == "messages"
    for bad in (dict(max_prompts=0), dict(max_json_depth=-1), dict(max_body_bytes=1.5), dict(max_prompt_tokens=True)):
        with pytest.raises(KilnError, match="must be a positive integer"):
            RequestLimits(**bad)


def test_serve_flags_default_to_request_limits():
    args = build_parser().parse_args(["serve", "some-model"])
    assert RequestLimits(max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth,
                         max_prompts=args.max_prompts, max_prompt_tokens=args.max_prompt_tokens) == RequestLimits()
    assert args.drain_timeout == DRAIN_TIMEOUT_S


@pytest.mark.parametrize("message, path", [
    ({"role": "wizard", "content": "Hi"}, "messages[0].role"),
    ({"role": "tool", "content": "Hi"}, "messages[0].tool_call_id"),
    ({"role": "user", "content": None}, "messages[0].content"), ({"role": "user"}, "messages[0].content"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content"),
    ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[0].content"),
    ({"role": "user", "content": "Hi", "name": 5}, "messages[0].name")])
def test_bad_chat_messages(message, path):
    with pytest.raises(APIError, match=re.escape(f"`{path}`")) as info:
        parse_request(ChatCompletionRequest, {"messages": [message]})
    assert info.value.status == 400 and info.value.param == "messages"


def test_chat_messages_pass_other_keys_to_the_template():
    request = parse_request(ChatCompletionRequest, {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann", "tool_call_id": None},
        {"role": "developer", "content": "x", "meta": {"k": [1]}}]})
    assert request.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann"},
        {"role": "developer", "content": "x", "meta": {"k": [1]}}]


def test_stop_list_length():
    assert len(parse_request(CompletionRequest, {"prompt": "Hi", "stop": ["x"] * MAX_STOP}).sampling_params().stop) == MAX_STOP
    with pytest.raises(APIError, match=f"at most {MAX_STOP}") as info:
        parse_request(CompletionRequest, {"prompt": "Hi", "stop": ["x"] * (MAX_STOP + 1)}).sampling_params()
    assert info.value.param == "stop"
