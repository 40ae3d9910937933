"""Server test fixtures: one SmolLM2 `kiln.LLM` for the session (compiled once through the
test session's compile cache), its reference outputs computed with the Python API *before* the
server owns the engine, and that LLM served in-process by uvicorn on a free 127.0.0.1 port,
with request limits (LIMITS) small enough for tests to reach; and a tiny random model with the
same tokenizer, served the same way, for tests that need a server but not real text (with
SmolLM2's chat template, and with a Qwen2.5-style one that renders tools).

The engine is single-threaded, so once the server runs nothing else may call `llm.engine`:
every reference a test compares with is computed in `references` first.
"""

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from kiln.frontend import load_checkpoint
from kiln.llm import LLM
from kiln.runtime.openai_protocol import RequestLimits
from kiln.runtime.request import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server import build_app

MODEL = "smollm2-test"
API_KEY = "test-key"
MAX_MODEL_LEN = 512
LIMITS = RequestLimits(max_prompts=8, max_prompt_tokens=2048)  # default body size and JSON depth
HERMES_TOOLS_TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "hermes_tools.jinja"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
# 16 distinct prompts; the concurrency test sends each from 4 clients at once
CONCURRENT_PROMPTS = [f"{subject} is" for subject in (
    "The sun", "A cat", "Python", "The ocean", "Music", "A good book", "The moon", "Coffee",
    "Mathematics", "A forest", "The internet", "Winter", "A bicycle", "Chess", "The river", "Bread")]
CONCURRENT_PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


REFERENCE_REQUESTS = {  # name -> (prompt or chat messages, params)
    "completion": ("The three primary colors are", SamplingParams(max_tokens=12, temperature=0.0, logprobs=3)),
    "chat": (CAPITAL, SamplingParams(max_tokens=20, temperature=0.0, logprobs=2)),
    "chat_stop": (CAPITAL, SamplingParams(max_tokens=20, temperature=0.0, stop=(" Paris",))),
    "sampled": ("Once upon a time", SamplingParams(n=2, temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, seed=1234,
                                                   max_tokens=8)),
    "penalized": ("The three primary colors are", SamplingParams(
        max_tokens=12, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3,
        min_tokens=4)),
    "cli": ("The capital of Italy is", SamplingParams(max_tokens=4, temperature=0.0)),
    **{f"concurrent-{i}": (p, CONCURRENT_PARAMS) for i, p in enumerate(CONCURRENT_PROMPTS)},
}


@pytest.fixture(scope="session")
def llm() -> LLM:
    return LLM("smollm2-135m", kv_cache_memory=128 << 20, max_model_len=MAX_MODEL_LEN, max_num_seqs=64,
               progress=False)


@pytest.fixture(scope="session")
def references(llm) -> dict[str, RequestOutput]:
    """Each REFERENCE_REQUESTS entry generated alone with the Python API. Under inference mode:
    the sampler modifies the executor's inference-mode logits in place for penalties and
    min_tokens, which torch only allows there (the server's engine thread does not; see
    test_penalties_and_min_tokens)."""
    out = {}
    with torch.inference_mode():
        for name, (prompt, params) in REFERENCE_REQUESTS.items():
            ids = llm.chat_prompt(prompt) if isinstance(prompt, list) else llm.encode(prompt)
            [out[name]] = llm.generate([ids], params)
    return out


@pytest.fixture(scope="session")
def reference_requests() -> dict:
    return REFERENCE_REQUESTS


@dataclass
class Server:
    url: str
    llm: LLM
    model: str = MODEL

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of GET /metrics: {"name{label=value}": value}."""
        with self.http() as http:
            text = http.get("/metrics").raise_for_status().text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once no sequence runs or waits and every KV block is free (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["kiln_num_requests_running"] == m["kiln_num_requests_waiting"] == 0
            if idle and m["kiln_kv_cache_blocks_free"] == m["kiln_kv_cache_blocks_total"]:
                return m
            assert time.monotonic() < deadline, f"server not idle after {timeout} s: {m}"
            time.sleep(0.1)


@contextmanager
def served(llm: LLM) -> Iterator[Server]:
    """`llm` served as MODEL on a free 127.0.0.1 port, with API_KEY and LIMITS, by uvicorn in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = build_app(llm, model_name=MODEL, api_key=API_KEY, limits=LIMITS)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Server(f"http://127.0.0.1:{port}", llm)
    finally:
        uv.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="session")
def server(llm, references):
    """The session's LLM, served (after `references`: from then on the server owns its engine)."""
    with served(llm) as s:
        yield s


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A 2-layer random Llama with SmolLM2's real tokenizer (as tests/e2e's tiny_model_dir), and
    SmolLM2's chat template."""
    smollm2 = load_checkpoint("smollm2-135m", progress=False)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    (path / "tokenizer.json").write_text(smollm2.tokenizer.to_str())
    return path, smollm2.chat_template


def tiny_with_template(checkpoint: Path, chat_template: str, folder: Path) -> LLM:
    """The tiny checkpoint (linked into `folder`) with `chat_template`: it compiles and runs in
    seconds, for tests where the text does not matter."""
    for file in checkpoint.iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return LLM(str(folder), kv_cache_memory=32 << 20, max_model_len=MAX_MODEL_LEN, max_num_seqs=64, progress=False)


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint, tmp_path_factory) -> LLM:
    """The tiny random Llama with SmolLM2's chat template (which does not render tools)."""
    checkpoint, chat_template = tiny_checkpoint
    return tiny_with_template(checkpoint, chat_template, tmp_path_factory.mktemp("tiny-smollm2-template"))


@pytest.fixture(scope="session")
def tool_llm(tiny_checkpoint, tmp_path_factory) -> LLM:
    """The tiny random Llama with a Qwen2.5-style template that renders tools (Hermes format)."""
    return tiny_with_template(tiny_checkpoint[0], HERMES_TOOLS_TEMPLATE.read_text(),
                              tmp_path_factory.mktemp("tiny-hermes-template"))


@pytest.fixture(scope="session")
def tool_server(tool_llm):
    """tool_llm, served."""
    with served(tool_llm) as s:
        yield s


@pytest.fixture(scope="session")
def tiny_server(tiny_llm):
    """tiny_llm, served."""
    with served(tiny_llm) as s:
        yield s
