"""`kiln.LLM`: the Python API. Given an artifact it serves it; given a model it compiles first
(for the local device, through the compile cache), then serves.

    llm = kiln.LLM("smollm2-135m")
    [out] = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
    print(out.outputs[0].text)
"""

from __future__ import annotations

import atexit
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kiln.errors import KilnError
from kiln.process import enable_interpreter
from kiln.runtime.artifact import MANIFEST, Artifact, load_artifact
from kiln.runtime.chat import ChatTemplate
from kiln.runtime.engine import LLMEngine
from kiln.runtime.manifest import TokenizerInfo
from kiln.runtime.request import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tensor_parallel import RankSetup, build_executor, check_degree, start_ranks


def local_target() -> str:
    """This machine's compile target: its GPU's (by architecture, then by name: an H200 is h200,
    not h100), else `cpu`."""
    if not torch.cuda.is_available():
        return "cpu"
    from kiln.codegen.targets import target_for_device

    if torch.version.hip:
        arch: int | str = torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
    else:
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    return target_for_device(arch, torch.cuda.get_device_name()).name


MAX_NUM_BATCHED_TOKENS = 2048  # a step's token budget, by default


def rank_setup(artifact: Artifact, tp: int, *, kv_cache_memory: int, max_model_len: int | None, host_cache_memory: int,
               interpret: bool, enforce_eager: bool, gpu_memory_utilization: float, max_num_seqs: int,
               max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS) -> RankSetup:
    """The executor every rank of `artifact` builds (one rank without tensor parallelism); the
    degree checked against the artifact's and this machine's GPUs first."""
    gpu_artifact = artifact.target != "cpu"
    check_degree(tp, artifact.tensor_parallel, gpu_artifact and not interpret)
    options = dict(kv_cache_memory=kv_cache_memory, max_model_len=max_model_len, host_cache_memory=host_cache_memory,
                   enforce_eager=enforce_eager)
    if gpu_artifact:
        options.update(interpret=interpret, gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager or None)
    return RankSetup(str(artifact.path), tp, gpu_artifact, options)


def open_artifact(model_or_artifact: str, *, target: str | None = None, progress: bool = True, tp: int = 1) -> Artifact:
    """The artifact at `model_or_artifact`, or the model compiled for `target` (default: this
    machine's device) through the compile cache; its weights' hash check may still be running
    (`Artifact.wait_verified`)."""
    if (Path(model_or_artifact) / MANIFEST).is_file():
        return load_artifact(model_or_artifact, weights_in_background=True)
    from kiln.compile_cache import CompileOptions, compile_cached  # the compiler itself only on a miss

    summary = compile_cached(model_or_artifact, CompileOptions(target=target or local_target(), tp=tp), progress=progress,
                             check_hashes=False)
    # a fresh compile needs no second hashing; a cache hit is hashed here, its weights while they load
    return load_artifact(summary.artifact, check_hashes=summary.cached, weights_in_background=True)


class LLM:
    """Offline generation over an artifact (or a model, compiled on first use)."""

    def __init__(self, model_or_artifact: str, *, kv_cache_memory: int = 1 << 30, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
                 enable_prefix_caching: bool = True,
                 target: str | None = None, interpret: bool = False, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, progress: bool = True,
                 state_snapshot_interval: int | None = None, host_cache_memory: int = 0, tp: int = 1):
        """`target` defaults to this machine's (cpu without a GPU). `interpret` runs a GPU
        artifact's Triton kernels under the Triton interpreter on the CPU (slow; for checking).
        Decode steps replay CUDA graphs on a GPU, CPU step graphs on the CPU, unless `enforce_eager`.
        `state_snapshot_interval`: for a model with recurrent layers, the tokens between the state
        snapshots that prefix caching keeps (a multiple of the block size); None: no prefix caching
        for such a model (snapshots take half the state slots and cut prefill chunks at each point).
        `host_cache_memory`: bytes of host memory for the prefix cache's host tier (runtime/kv_tiers.py):
        blocks evicted from the KV pool are kept there and copied back on a hit (0: no tier).
        `tp`: tensor-parallel degree (the model is compiled for it; ranks 1.. run in processes of
        their own, runtime/tensor_parallel.py)."""
        if interpret:
            enable_interpreter()  # must precede the first triton import
        self.artifact = open_artifact(model_or_artifact, target=target, progress=progress, tp=tp)
        if interpret and self.artifact.target == "cpu":
            raise KilnError(f"--interpret runs a GPU artifact's Triton kernels on the CPU, but {self.artifact.path} is "
                            "compiled for the cpu target: give a GPU --target (e.g. --target h100) or a GPU artifact")
        tokenizer_info = self.artifact.manifest.tokenizer
        if not tokenizer_info.file:
            raise KilnError(f"artifact {self.artifact.path} has no tokenizer; kiln needs tokenizer.json to serve text")
        self.tokenizer = Tokenizer.from_file(str(self.artifact.file(tokenizer_info.file)))
        setup = rank_setup(self.artifact, tp, kv_cache_memory=kv_cache_memory, max_model_len=max_model_len,
                           host_cache_memory=host_cache_memory, interpret=interpret, enforce_eager=enforce_eager,
                           gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens)
        if tp > 1:
            self.executor = start_ranks(setup)
            atexit.register(self.executor.close)
        else:
            self.executor = build_executor(setup, artifact=self.artifact)
        self.engine = LLMEngine(self.executor, self.tokenizer, eos_token_ids=tokenizer_info.eos_token_ids,
                                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching,
                                state_snapshot_interval=state_snapshot_interval)
        self.chat_template = self._chat_template(tokenizer_info)
        self._ids = itertools.count()
        self.artifact.wait_verified()  # the weights' hashes, checked while the executor loaded them

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel model (a no-op otherwise; also at exit)."""
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()

    def _chat_template(self, info: TokenizerInfo) -> ChatTemplate | None:
        if not info.chat_template:
            return None
        token = lambda i: self.tokenizer.id_to_token(i) or "" if i is not None else ""  # noqa: E731
        eos = info.eos_token_ids[0] if info.eos_token_ids else None
        template = self.artifact.file(info.chat_template).read_text()
        return ChatTemplate(template, bos_token=token(info.bos_token_id), eos_token=token(eos))

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's own special tokens), or ids as given."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt).ids
        return list(prompt)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of OpenAI-style chat messages through the model's chat template."""
        if self.chat_template is None:
            raise KilnError("this model has no chat template; use a plain prompt instead of chat messages")
        return self.tokenizer.encode(self.chat_template.render(messages), add_special_tokens=False).ids

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields one request's outputs as it advances (each with `delta_text`), the last finished."""
        request_id = f"stream-{next(self._ids)}"
        self.engine.add_request(request_id, self.encode(prompt), params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            if self.engine.has_unfinished_requests():
                self.engine.abort(request_id)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Final outputs for `prompts` (a text, token ids, or a list of either), in order; all run
        together with continuous batching."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise KilnError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; give one or one each")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params_list):
            self.engine.add_request(request_id, self.encode(prompt), p)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """The final output for one conversation."""
        return self.generate([self.chat_prompt(messages)], params)[0]
