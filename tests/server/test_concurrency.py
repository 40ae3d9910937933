"""64 streaming clients at once (AsyncOpenAI): every stream completes, and each greedy output
equals the one `kiln.LLM` generated for that prompt alone. A request being tokenized does not
hold up the others."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow
CLIENTS = 64


async def stream_completion(client, model: str, prompt: str, max_tokens: int) -> tuple[str, list, object]:
    """(text, finish reasons of the chunks, usage) of one streamed completion."""
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, finish_reasons, usage = "", [], None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finish_reasons.append(chunk.choices[0].finish_reason)
        usage = chunk.usage or usage
    return text, finish_reasons, usage


def test_64_concurrent_streams(server, references, reference_requests):
    names = [f"concurrent-{i % 16}" for i in range(CLIENTS)]  # each of the 16 prompts from 4 clients

    async def run_all():
        async with server.async_client() as client:
            return await asyncio.gather(*(
                stream_completion(client, server.model, reference_requests[name][0],
                                  reference_requests[name][1].max_tokens) for name in names))

    before = server.metrics()
    results = asyncio.run(asyncio.wait_for(run_all(), timeout=300))
    for name, (text, finish_reasons, usage) in zip(names, results):
        expected = references[name].outputs[0]
        assert text == expected.text, name
        assert finish_reasons[-1] == "length" and set(finish_reasons[:-1]) <= {None}
        assert usage.completion_tokens == len(expected.token_ids) == reference_requests[name][1].max_tokens
        assert usage.prompt_tokens == len(references[name].prompt_token_ids)
    after = server.wait_idle()
    finished = "kiln_request_success_total{finished_reason=length}"
    assert after[finished] - before.get(finished, 0) == CLIENTS
    assert after["kiln_time_to_first_token_seconds_count"] - before["kiln_time_to_first_token_seconds_count"] == CLIENTS


class GatedTokenizer:
    """A tokenizer whose `encode_batch` waits for `gate` (a tokenization that takes as long as the
    test wants); everything else is the real one's."""

    def __init__(self, tokenizer, gate: threading.Event):
        self._tokenizer, self._gate = tokenizer, gate
        self.waiting = threading.Event()

    def encode_batch(self, *args, **kwargs):
        self.waiting.set()
        assert self._gate.wait(30), "the test never opened the gate"
        return self._tokenizer.encode_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})])
def test_tokenizing_does_not_block_other_requests(tiny_server, monkeypatch, path, body):
    """While one request is being tokenized (here: for as long as the test holds the gate), the
    server answers others: tokenization runs off the event loop."""
    gate = threading.Event()
    gated = GatedTokenizer(tiny_server.llm.tokenizer, gate)
    monkeypatch.setattr(tiny_server.llm, "tokenizer", gated)
    with ThreadPoolExecutor(1) as pool, tiny_server.http(timeout=30) as http:
        slow = pool.submit(http.post, path, json=body)
        assert gated.waiting.wait(30)
        assert http.get("/health", timeout=5).status_code == 200
        assert http.get("/v1/models", timeout=5).status_code == 200
        assert not slow.done()
        gate.set()
        assert slow.result().status_code == 200, slow.result().text
