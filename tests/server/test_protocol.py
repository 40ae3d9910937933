"""OpenAI request fields map onto SamplingParams as the OpenAI API defines them (no model
needed): defaults, null meaning default, chat's token-limit and logprobs fields, prompt forms."""

import pytest

from kiln.runtime.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from kiln.runtime.sampling_params import SamplingParams


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
    assert parse_request(ChatCompletionRequest, {"messages": []}).sampling_params() == SamplingParams(max_tokens=None)


def test_chat_token_limit_and_logprobs():
    def params(**fields):
        return parse_request(ChatCompletionRequest, {"messages": [], **fields}).sampling_params()

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
