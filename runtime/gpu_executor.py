"""Runs a GPU artifact's step programs: the `Executor` for GPU targets (same interface as CpuExecutor).

On a CUDA GPU the programs launch the artifact's AOT-compiled kernels (runtime/launcher.py).
With `interpret=True` the same programs run the same kernels' sources under Triton's interpreter
on the CPU: slow, for verifying an artifact on a machine without its GPU. Decode-only batches
run the `decode` program, every other batch the `mixed` one. On a GPU, unless `enforce_eager`,
steps replay CUDA graphs captured at start-up (runtime/cuda_graphs.py): decode batches of up to
min(max_num_seqs, 256) sequences per (batch-size bucket, context bucket), mixed batches of up to
max_num_batched_tokens tokens over up to min(max_num_seqs, 256) + 1 sequences per (token bucket,
sequence bucket), padded to their bucket; larger batches run eagerly. Interpreted, every step
runs eagerly unless `enforce_eager=False` asks for the same static buffers, padding and buckets
without the capture (tests).

KV cache size:
  GPU        after the weights are loaded, a warm-up runs a mixed step of
             `max_num_batched_tokens` tokens over `max_num_seqs` sequences and a decode step of
             those sequences (this also loads every kernel), with a cache just large enough; then
             num_blocks = (total memory * gpu_memory_utilization - memory used outside torch
             - torch's peak without the warm-up cache) // bytes per block.
  interpret  num_blocks = kv_cache_memory // bytes per block.
A model with recurrent layers first gets its state pool (runtime/state_pool.py: one slot per
sequence up to max_num_seqs, within a quarter of the budget); the KV cache has what is left.
The CUDA graphs are captured after the KV cache is allocated; their shared memory pool (the
activations of the largest bucket: a mixed step of max_num_batched_tokens tokens, as the warm-up's
peak) comes out of the 1 - gpu_memory_utilization margin.

A tensor-parallel rank (`comm`) builds its graphs only once the ranks agreed on the context
(`join_group`, from runtime/tensor_parallel.py), so that every rank captures the same buckets in
the same order and the collectives captured in them pair up; the dry runs that plan the buckets
call a `DryComm`, which communicates nothing.

Before anything is loaded, a GPU artifact is refused without a CUDA GPU (pointing to --interpret
and the cpu target), and on a GPU of another architecture than its kernels' (naming both).
"""

from __future__ import annotations

import logging

import safetensors.torch
import torch

from kiln.errors import KilnError
from kiln.process import enable_interpreter
from kiln.quant import Weight, assemble_weights
from kiln.runtime import kv_groups, kv_tiers, state_pool
from kiln.runtime.artifact import PHASES, Artifact
from kiln.runtime.collectives import Comm, DryComm
from kiln.runtime.cuda_graphs import StepGraphs
from kiln.runtime.executor import fitted_context, import_program
from kiln.runtime.launcher import Launcher
from kiln.runtime.step_batch import StepBatch

log = logging.getLogger("kiln.executor")


class GpuExecutor:
    """Executes a GPU-target artifact: on its GPU, or interpreted on the CPU (`interpret=True`)."""

    def __init__(self, artifact: Artifact, *, interpret: bool = False, gpu_memory_utilization: float = 0.9,
                 kv_cache_memory: int = 256 << 20, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, enforce_eager: bool | None = None,
                 host_cache_memory: int = 0, rank: int = 0, comm: Comm | None = None):
        manifest = artifact.manifest
        if not manifest.kernels:
            raise KilnError(f"artifact {artifact.path} targets {artifact.target!r}, which has no GPU kernels; "
                            "serve it with the cpu executor, or recompile with a GPU --target")
        if not 0 < gpu_memory_utilization <= 1:
            raise KilnError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.device = torch.device("cpu" if interpret else "cuda")
        if interpret:
            enable_interpreter()
        else:
            _check_gpu(artifact)
        self.block_size = manifest.block_size
        self.vocab_size = manifest.vocab_size
        self.max_model_len = min(max_model_len or manifest.max_model_len, manifest.max_model_len)
        self._scratch = ScratchAllocator(self.device)
        self._scratch.install()
        self.comm = comm  # the rank's communicator (a tensor-parallel artifact), else None
        self.dry_comm = None if comm is None else DryComm(comm.rank, comm.size)
        self.weights = _load_weights(artifact, self.device, rank)
        self.programs = {phase: import_program(artifact, phase) for phase in PHASES}
        self.launcher = Launcher(artifact.path, manifest.kernels, self.device)
        self.cache_groups = kv_groups.manifest_groups(manifest)
        self.block_bytes = kv_groups.block_bytes(self.cache_groups)
        self.state_groups = list(manifest.recurrent_groups)
        pool_budget = kv_cache_memory if interpret else int(torch.cuda.mem_get_info()[0] * gpu_memory_utilization)
        self.num_state_slots = state_pool.fit_state_slots(self.state_groups, pool_budget, max_num_seqs)
        self.state_pool = state_pool.allocate_state_pool(self.state_groups, self.num_state_slots, self.device)
        if interpret:
            kv_budget = kv_cache_memory - state_pool.pool_bytes(self.state_groups, self.num_state_slots)
            self.num_blocks = kv_budget // self.block_bytes if self.block_bytes else 0  # 0: no attention layers
            budget = f"a KV-cache budget of {kv_cache_memory / 2**20:.0f} MiB"
            advice = "raise --kv-cache-memory"
        else:
            self.num_blocks = self._measure_blocks(gpu_memory_utilization, max_num_batched_tokens, max_num_seqs)
            budget = f"--gpu-memory-utilization {gpu_memory_utilization}"
            advice = "raise --gpu-memory-utilization"
        policies = [kv_groups.GroupPolicy(g) for g in self.cache_groups]
        self.max_model_len = fitted_context(self.max_model_len, kv_groups.capacity_tokens(policies, max(0, self.num_blocks)),
                                            explicit=max_model_len is not None, budget=budget, advice=advice)
        self.states = self._allocate_states(self.num_blocks)
        log.info("%s on %s", kv_groups.capacity_line(self.cache_groups, self.num_blocks), self.device)
        self.host_tier = kv_tiers.allocate_host_tier(
            {name: t for name, t in self.states.items() if name not in self.state_pool}, host_cache_memory)
        self.num_host_blocks = self.host_tier.num_blocks if self.host_tier else 0
        self.graphs: StepGraphs | None = None
        self._graph_sizes = None if (interpret if enforce_eager is None else enforce_eager) else dict(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, capture=not interpret)
        if comm is None:
            self._build_graphs()

    def join_group(self, max_model_len: int) -> None:
        """A tensor-parallel rank, once the ranks agreed on the context (the smallest any can hold,
        runtime/tensor_parallel.py): takes it and builds its step graphs. Every rank then captures
        the same buckets in the same order, so the collectives captured in them pair up."""
        self.max_model_len = max_model_len
        self._build_graphs()

    def _build_graphs(self) -> None:
        if self._graph_sizes is not None:
            self.graphs = StepGraphs(self._decode, self._mixed, self.launcher, max_model_len=self.max_model_len,
                                     block_size=self.block_size, num_groups=len(self.cache_groups),
                                     padding_slot=self.num_state_slots, **self._graph_sizes)

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """fp32 logits [B, vocab] on the executor's device (the engine owns them)."""
        self._scratch.install()  # the engine may step from another thread than the one that built this
        kv_tiers.run_transfers(self.host_tier, batch.kv_transfers)
        state_pool.copy_slots(self.state_pool, list(batch.state_copies))
        graphs = self.graphs.family(batch) if self.graphs is not None else None
        logits = graphs.execute(batch) if graphs is not None else self._run(batch, self.states)
        return logits.to(torch.float32, copy=True)  # a normal tensor, not a buffer view: the sampler edits it

    def _run(self, batch: StepBatch, states: dict) -> torch.Tensor:
        """The logits of `batch` from an eager run of its phase's program (a view of its buffers)."""
        phase = "decode" if batch.is_decode_only else "mixed"
        return self._step(phase, batch.inputs(), states, self.launcher)

    def _decode(self, inputs: dict, launcher) -> torch.Tensor:
        return self._step("decode", inputs, self.states, launcher)

    def _mixed(self, inputs: dict, launcher) -> torch.Tensor:
        return self._step("mixed", inputs, self.states, launcher)

    def _step(self, phase: str, inputs: dict, states: dict, launcher) -> torch.Tensor:
        comm = self.dry_comm if launcher.dry_run else self.comm
        with torch.inference_mode():
            return self.programs[phase].step(inputs, self.weights, states, launcher,
                                             *(() if comm is None else (comm,)))["logits"]

    def _allocate_states(self, num_blocks: int) -> dict[str, torch.Tensor]:
        """KV caches of `num_blocks` blocks, and the state pool (allocated once, before the warm-up)."""
        return {**kv_groups.allocate_kv_states(self.cache_groups, num_blocks, self.device), **self.state_pool}

    def _measure_blocks(self, utilization: float, max_tokens: int, max_seqs: int) -> int:
        """KV blocks that fit once the weights and the peak activations of a warm-up are counted."""
        seqs = max(1, min(max_seqs, max_tokens))
        lengths = [max_tokens // seqs + (i < max_tokens % seqs) for i in range(seqs)]
        if max(lengths) + 1 > self.max_model_len:
            raise KilnError(f"the warm-up prompt of {max(lengths)} tokens exceeds max_model_len={self.max_model_len}: "
                            "lower --max-num-batched-tokens or raise --max-num-seqs")
        blocks_per_seq = -(-(max(lengths) + 1) // self.block_size)
        self.launcher.load_all()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        warmup_states = self._allocate_states(seqs * blocks_per_seq)
        for batch in warmup_batches(lengths, self.block_size, blocks_per_seq, len(self.cache_groups)):
            self._run(batch, warmup_states)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - seqs * blocks_per_seq * self.block_bytes
        del warmup_states
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        outside_torch = total - free - torch.cuda.memory_reserved()
        available = total * utilization - outside_torch - peak
        log.info("GPU memory: %.2f GiB total, %.2f GiB peak in torch (weights + activations), %.2f GiB outside "
                 "torch; %.2f GiB for the KV cache", total / 2**30, peak / 2**30, outside_torch / 2**30,
                 available / 2**30)
        return int(available // self.block_bytes) if self.block_bytes else 0  # 0: no attention layers


def warmup_batches(lengths: list[int], block_size: int, blocks_per_seq: int, num_groups: int = 1) -> list[StepBatch]:
    """A mixed step that prefills sequences of `lengths` tokens (token id 0), then a decode step
    of one more token each; sequence i owns blocks [i * blocks_per_seq, (i + 1) * blocks_per_seq)
    in every cache group (the warm-up's caches are scratch: groups may write the same slots)."""
    seqs = len(lengths)
    tables = torch.arange(seqs * blocks_per_seq, dtype=torch.int32).reshape(seqs, blocks_per_seq)

    def batch(starts: list[int], counts: list[int], num_decodes: int) -> StepBatch:
        positions = torch.cat([torch.arange(s, s + c, dtype=torch.int32) for s, c in zip(starts, counts)])
        owner = torch.repeat_interleave(torch.arange(seqs), torch.tensor(counts))
        query_start = torch.zeros(seqs + 1, dtype=torch.int32)
        query_start[1:] = torch.tensor(counts).cumsum(0)
        slots = tables[owner, positions // block_size] * block_size + positions % block_size
        return StepBatch(input_ids=torch.zeros(len(positions), dtype=torch.int32), positions=positions,
                         query_start=query_start,
                         seq_lens=torch.tensor([s + c for s, c in zip(starts, counts)], dtype=torch.int32),
                         block_tables=tables, slot_mapping=slots.int(), logits_indices=query_start[1:] - 1,
                         num_decodes=num_decodes, group_tables=((tables, slots.int()),) * (num_groups - 1))

    return [batch([0] * seqs, lengths, num_decodes=0), batch(lengths, [1] * seqs, num_decodes=seqs)]


def _load_weights(artifact: Artifact, device: torch.device, rank: int = 0) -> dict[str, Weight]:
    """The artifact's weights (rank `rank`'s shards) on `device`, each tensor in its own allocation; a quantized one
    (the manifest's `quantized_weights`) as a kiln.quant.QuantizedTensor of its two tensors, whose
    qweight and scales the programs pass to the kernels. On a GPU that is how safetensors places
    them; on the CPU it maps the file, where a tensor starts wherever the previous one ended, so
    interpreted runs copy them out: the launcher's 16-byte alignment checks then see the addresses
    a GPU run would (a file offset is not a GPU address)."""
    weights = safetensors.torch.load_file(artifact.weights_file(rank), device=str(device))
    if device.type == "cpu":
        weights = {name: tensor.clone() for name, tensor in weights.items()}
    return assemble_weights(weights, artifact.manifest.quantized_weights)


class ScratchAllocator:
    """Global scratch memory that a kernel asks for at launch, from torch's caching allocator.

    A Triton kernel whose metadata has `global_scratch_size` > 0 (one that builds TMA descriptors
    on the device, e.g. `tl.make_tensor_descriptor`) gets that many bytes per program from the
    allocator given to `triton.set_allocator`; without one, its launch raises. torch's allocator
    keeps the bytes stream-ordered (reused only after the kernel, on the same stream) and inside a
    CUDA graph's memory pool during capture, so a replay finds them at the captured address.
    Triton keeps the allocator in a context variable, which a new thread does not inherit: the
    executor installs it again at every step (one context-variable write), on whatever thread runs
    the step. Harmless when interpreting: the interpreter never asks for scratch."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, size: int, alignment: int, stream: int | None) -> torch.Tensor:
        """`size` bytes starting at a multiple of `alignment` (torch's CUDA blocks start on 512-byte
        boundaries, so the view is at offset 0 there; a larger alignment is honoured too)."""
        buffer = torch.empty(size + alignment - 1, dtype=torch.int8, device=self.device)
        start = -buffer.data_ptr() % alignment
        return buffer[start: start + size]

    def install(self) -> None:
        """Makes this the allocator of the kernels launched from the calling thread."""
        import triton  # here, not at the top: --interpret must set TRITON_INTERPRET before triton loads

        triton.set_allocator(self)


def _check_gpu(artifact: Artifact) -> None:
    """Refuses a machine without a CUDA GPU, or a GPU of another architecture than the kernels'."""
    if not torch.cuda.is_available():
        raise KilnError(f"artifact {artifact.path} holds {artifact.target} kernels ({artifact.arch}), but this machine "
                        "has no CUDA GPU (torch.cuda.is_available() is False): serve a --target cpu artifact here "
                        "(`kiln compile <model> --target cpu`), or check this one with --interpret (slow)")
    artifact.check_device(_device_arch(), torch.cuda.get_device_name())


def _device_arch() -> str:
    """This GPU's architecture, named as artifacts name theirs less the "a": sm_90 for compute
    capability 9.0; gfx942 for an AMD GPU under a ROCm torch."""
    if torch.version.hip:
        return torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"
