"""The official `openai` client against a live server on 127.0.0.1: completions and chat,
streamed and not, equal what `kiln.LLM` generates alone for the same request (text, tokens,
logprobs, finish reason, usage).

Logprobs agree within LOGPROB_TOLERANCE, not bit for bit: the server's request finds the
reference's prompt in the prefix cache and computes only its last prompt token, at one row of x,
where the cpu kernels multiply int16 activations (runtime/cpu_quant.py), while the reference
prefilled that token among the others with fp32 ones; SmolLM2's chat answer then moves its
logprobs by up to ~2e-4."""

import pytest

pytestmark = pytest.mark.slow
LOGPROB_TOLERANCE = 2e-3


def openai_fields(params) -> dict:
    """The request fields for SamplingParams `params`: OpenAI's, then kiln's extensions."""
    fields = dict(n=params.n, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                  presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
    if params.stop:
        fields["stop"] = list(params.stop)
    extensions = dict(top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                      min_tokens=params.min_tokens, ignore_eos=params.ignore_eos)
    return {**{k: v for k, v in fields.items() if v is not None}, "extra_body": extensions}


def raw_fields(params) -> dict:
    """openai_fields as one JSON body (for plain HTTP requests)."""
    fields = openai_fields(params)
    extensions = fields.pop("extra_body")
    return {**fields, **extensions}


def decode(server, token_id: int) -> str:
    return server.llm.tokenizer.decode([token_id], skip_special_tokens=False)


def test_completion_equals_llm(server, references, reference_requests):
    prompt, params = reference_requests["completion"]
    ref = references["completion"]
    with server.client() as client:
        response = client.completions.create(model=server.model, prompt=prompt, max_tokens=params.max_tokens,
                                             logprobs=params.logprobs, **openai_fields(params))
    [choice] = response.choices
    expected = ref.outputs[0]
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == len(ref.prompt_token_ids) + len(expected.token_ids)
    lp = choice.logprobs
    assert lp.tokens == [decode(server, t) for t in expected.token_ids]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs], abs=LOGPROB_TOLERANCE)
    assert [set(top) for top in lp.top_logprobs] == [{decode(server, i) for i in t.top_token_ids}
                                                      for t in expected.logprobs]
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]


def test_completion_stream_equals_llm(server, references, reference_requests):
    prompt, params = reference_requests["completion"]
    expected = references["completion"].outputs[0]
    with server.client() as client:
        chunks = list(client.completions.create(
            model=server.model, prompt=prompt, max_tokens=params.max_tokens, logprobs=params.logprobs, stream=True,
            stream_options={"include_usage": True}, **openai_fields(params)))
    *deltas, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == len(expected.token_ids)
    assert last.usage.prompt_tokens == len(references["completion"].prompt_token_ids)
    assert all(c.usage is None and len(c.choices) == 1 for c in deltas)
    assert "".join(c.choices[0].text for c in deltas) == expected.text
    assert [c.choices[0].finish_reason for c in deltas] == [None] * (len(deltas) - 1) + [expected.finish_reason]
    streamed = [lp for c in deltas for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx([t.logprob for t in expected.logprobs], abs=LOGPROB_TOLERANCE)


def test_chat_equals_llm(server, references, reference_requests):
    messages, params = reference_requests["chat"]
    expected = references["chat"].outputs[0]
    with server.client() as client:
        response = client.chat.completions.create(model=server.model, messages=messages, logprobs=True,
                                                  top_logprobs=params.logprobs,
                                                  max_completion_tokens=params.max_tokens, **openai_fields(params))
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text == "The capital of France is Paris."
    assert choice.finish_reason == expected.finish_reason == "stop"
    assert response.usage.prompt_tokens == len(references["chat"].prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.token_ids)
    content = choice.logprobs.content
    assert [c.token for c in content] == [decode(server, t) for t in expected.token_ids]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in expected.logprobs], abs=LOGPROB_TOLERANCE)
    assert [[t.token for t in c.top_logprobs] for c in content] == [
        [decode(server, i) for i in t.top_token_ids] for t in expected.logprobs]
    assert all(c.bytes == list(c.token.encode()) for c in content)


def test_chat_stream_equals_llm(server, references, reference_requests):
    messages, params = reference_requests["chat"]
    expected = references["chat"].outputs[0]
    with server.client() as client:
        chunks = list(client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=params.max_tokens, stream=True,
            stream_options={"include_usage": True}, **openai_fields(params)))
    first, *deltas, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in deltas) == expected.text
    assert deltas[-1].choices[0].finish_reason == "stop"
    assert last.choices == [] and last.usage.completion_tokens == len(expected.token_ids)


def test_chat_stop_string(server, references, reference_requests):
    messages, params = reference_requests["chat_stop"]
    expected = references["chat_stop"].outputs[0]
    assert references["chat"].outputs[0].text.startswith(expected.text + " Paris")  # the stop string mattered
    with server.client() as client:
        chunks = list(client.chat.completions.create(model=server.model, messages=messages, stream=True,
                                                     max_tokens=params.max_tokens, **openai_fields(params)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_fields_reach_the_sampler(server, references, reference_requests):
    """n=2 seeded sampling with temperature, top-p, top-k and min-p: both choices equal the
    Python API's."""
    prompt, params = reference_requests["sampled"]
    expected = references["sampled"].outputs
    assert expected[0].text != expected[1].text
    with server.client() as client:
        response = client.completions.create(model=server.model, prompt=prompt, max_tokens=params.max_tokens,
                                             **openai_fields(params))
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert response.usage.completion_tokens == sum(len(e.token_ids) for e in expected)


def test_penalties_and_min_tokens(server, references, reference_requests):
    prompt, params = reference_requests["penalized"]
    expected = references["penalized"].outputs[0]
    assert expected.text != references["completion"].outputs[0].text  # the penalties matter
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": server.model, "prompt": prompt,
                                                       "max_tokens": params.max_tokens, **raw_fields(params)})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected.text


@pytest.mark.parametrize("as_token_ids", [False, True], ids=["texts", "token_ids"])
def test_prompt_list(server, references, reference_requests, as_token_ids):
    """A list of prompts gives one choice per prompt, in order."""
    (first, params), (second, _) = reference_requests["concurrent-0"], reference_requests["concurrent-1"]
    prompts = [server.llm.encode(p) for p in (first, second)] if as_token_ids else [first, second]
    with server.client() as client:
        response = client.completions.create(model=server.model, prompt=prompts, max_tokens=params.max_tokens,
                                             **openai_fields(params))
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [references[f"concurrent-{i}"].outputs[0].text for i in (0, 1)]
    assert response.usage.prompt_tokens == sum(len(references[f"concurrent-{i}"].prompt_token_ids) for i in (0, 1))


def test_models_and_health(server):
    with server.client() as client:
        assert [m.id for m in client.models.list()] == [server.model]
    with server.http() as http:
        assert http.get("/health").status_code == 200
