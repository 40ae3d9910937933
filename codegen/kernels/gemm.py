"""GEMM / GEMV: out[M, N] = epilogue(prologue(...) @ W^T), W stored [S*N, K] (nn.Linear layout).

W is either dense (the activations' dtype) or quantized (`Variant.quant`, a kiln.quant format:
codes and group scales, dequantized per K block in the main loop; codegen/kernels/gemm_quant.py).

fp32 accumulation; M (output rows) is a runtime argument, N and K are compiled in. The matmul
reads x: [M, K] (`p_x`) and W; `bias` adds the linear's bias[S*N] to the accumulators.

Prologue (`Prologue`): the matmul's rows are computed while they stream through the K loop, in
[BLOCK_M, BLOCK_K] blocks, by fp32 Triton statements over the prologue operands ([M, K] tensors,
read directly or through a row gather `p_rows`; [K] vectors; [M, 1] rows; scalars), constants
and the rsqrt statistics of RMSNorms over the whole K row. Each norm's statistic comes from its
own pre-pass over K (in dependency order; a pre-pass recomputes the values its norm reads, and
re-reads the tile's rows from cache), not from the main loop, whose registers stay the
accumulators'. A norm that feeds the matmul directly is applied to the accumulators' rows after
the loop (`scale`): norm(v) @ W^T = rstd * (v @ W^T). Prologue values the fused group needs
elsewhere (`escaping`, [M, K]) are stored by the programs of the first output-tile column.

Epilogue (`Epilogue`): fp32 Triton statements over the accumulators `acc0 .. acc{S-1}` (the S
column slices [j*N, (j+1)*N) of the S*N-wide linear: S = 2 for a packed gate/up projection),
epilogue operands ([M, N] tiles, [N] columns, [M, 1] rows, scalars) and constants. Its outputs
(each [M, N]) are stored to p_out, p_out1, ...; `out` may be one of the [M, N] operands itself
(an in-place residual add).

Blocks: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M; tile kind "gemm", bucket by M (`bucket`). Extra live
[BLOCK_M, BLOCK_N] tiles (more accumulators, loaded [M, N] operands) may halve BLOCK_N so that
registers do not spill (see `choose`).

Serial split-K (`Variant.split_k` > 1, the compiled-in SPLIT_K; `choose` picks it for decode-sized
M on GPUs whose SMs the output tiles alone would leave idle). One launch of tiles * SPLIT_K
programs (`grid`): program p computes output tile p // SPLIT_K over split s = p % SPLIT_K of the
K blocks, [s*KB, min((s+1)*KB, cdiv(K, BLOCK_K))) with KB = cdiv(cdiv(K, BLOCK_K), SPLIT_K).
RMSNorm pre-passes still run over the whole K row in every program (the statistic needs the full
row); `scale` is linear, so it scales each partial; escaping prologue values are stored by each
split of the first tile column for its own K range. Each program stores its fp32 partial
accumulators (all slices) to the workspace `p_partial` ([SPLIT_K, slices, M, N] fp32,
`workspace_values`), then increments its tile's counter in `p_counters` (int32, one per output
tile, `counter_count`). The program that sees SPLIT_K - 1 (the last to arrive) loads all
partials, sums them in split order 0..SPLIT_K-1 (the result does not depend on arrival order),
stores 0 back to the counter, adds the bias, runs the epilogue and stores the outputs; the others
store nothing else. The counters are therefore zero on entry and zero again on exit (the next
launch and CUDA graph replays need no memset); `launch` allocates both buffers itself, a program
emitter passes them as the two pointer arguments after M (`workspace_arguments`), both 16-byte
aligned and never shared by two launches in flight at once.

Memory ordering (as CUTLASS's semaphore split-K and stream-K fixup): a program's threads store
their partials with plain stores; `tl.debug_barrier()` (bar.sync) orders every thread's stores
before the counter's atomic, which is acq_rel at gpu scope: its release half (cumulative through
the barrier) publishes the whole CTA's partials to any program whose atomic reads the count
after it. The atomics of one tile form a single modification order, so exactly one program reads
SPLIT_K - 1, and its acquire half happens after every other split's release: the loads that
follow (after the barrier that broadcasts the scalar result to the CTA; `.cg` loads, which bypass
the non-coherent L1) see every partial. Under TRITON_INTERPRET=1 the programs run one by one, so
the same code is trivially ordered.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
import triton

from kiln.codegen.kernels import (
    TORCH_DTYPES,
    check_layout,
    compiled_grid,
    gemm_quant,
    load_source,
    next_power_of_2,
    pointer,
    render_kernel,
)
from kiln.codegen.targets import Target
from kiln.quant import QuantFormat, QuantizedTensor
from kiln.runtime import step_support
from kiln.runtime.triton_device import helper_names

# Operand layouts. Prologue: "mk" [M, K] (rows o_m), "mk_rows" [R, K] read at rows[m], "k" [K];
# epilogue: "mn" [M, N], "n" [N]; both: "m" [M, 1] per-row values, "s" a scalar (0-d tensor).
# "rows" is the gather index [M] int32 itself.
PROLOGUE_LAYOUTS = ("mk", "mk_rows", "k", "m", "s", "rows")
EPILOGUE_LAYOUTS = ("mn", "n", "m", "s")
# fp32 values per thread the epilogue's live tiles may hold; beyond it ptxas spills (seen with
# a 128x256 accumulator plus a residual tile on 8 warps on sm_90a).
EPILOGUE_VALUES_PER_THREAD = 128
# Extra tl.dot arguments per dtype: fp32 GEMMs stay exact fp32 (no tf32).
DOT_OPTIONS = {"fp32": ', input_precision="ieee"', "bf16": "", "fp16": ""}
KIND = "gemm"
# the narrowest BLOCK_N and BLOCK_K `choose` goes down to when it fills the GPU at decode sizes
MIN_FILL_BLOCK = 32
# A GEMM of at most this many weights streams them in well under 0.1 us at any target's HBM
# bandwidth (256 KB in bf16), far below one launch: its time is latency, which more programs
# (narrower tiles, split-K's partials and atomics) would not shorten. Such GEMMs are not filled.
FILL_MIN_WEIGHTS = 1 << 17
_VALUE = re.compile(r"\bb_\w+")
_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")


def accumulator(j: int) -> str:
    """The epilogue's name of the fp32 accumulator of the linear's j-th column slice."""
    return f"acc{j}"


@dataclass(frozen=True)
class Prologue:
    """What the matmul's x rows are: statements (name, fp32 Triton expression) over
    [BLOCK_M, BLOCK_K] blocks. Names are `b_...`: an operand `p_foo` is read as `b_foo`; `x`
    itself is `b_x` (kernel argument p_x, layout `x_layout`); norm j's statistic is `b_rstd{j}`."""

    ops: tuple[str, ...] = ()  # op names, for the cache key
    operands: tuple[tuple[str, str], ...] = ()  # (kernel argument, layout) beside p_x
    statements: tuple[tuple[str, str], ...] = ()  # (value, expression), in dependency order
    norms: tuple[tuple[str, float], ...] = ()  # norm j: (value whose rows it normalizes, eps) -> b_rstd{j}
    x: str = "b_x"  # the value the matmul reads (before `scale`)
    x_layout: str = "mk"  # p_x read directly ("mk") or through the row gather ("mk_rows")
    scale: str | None = None  # an rstd that scales the accumulators' rows after the loop
    escaping: tuple[str, ...] = ()  # values stored ([M, K]) to p_x_out0, p_x_out1, ...

    @property
    def gather(self) -> bool:
        return any(layout == "rows" for _, layout in self.operands)


@dataclass(frozen=True)
class Epilogue:
    """Statements over the accumulators acc0..acc{slices-1} ([BLOCK_M, BLOCK_N] fp32 each)."""

    ops: tuple[str, ...] = ()  # op names, for the cache key
    slices: int = 1  # the linear is slices * N wide
    operands: tuple[tuple[str, str], ...] = ()  # (kernel argument, layout); read as b_<argument[2:]>
    statements: tuple[tuple[str, str], ...] = ()  # (value, expression), in order
    outputs: tuple[str, ...] = ("acc0",)  # values stored to p_out, p_out1, ...


@dataclass(frozen=True)
class Variant:
    dtype: str  # x, W, the operands and the outputs
    n: int  # N output columns
    k: int  # K reduction length
    epilogue: Epilogue
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    prologue: Prologue = field(default_factory=Prologue)
    bias: bool = False
    split_k: int = 1  # SPLIT_K programs per output tile (serial split-K; see the module docstring)
    quant: QuantFormat | None = None  # W's format when quantized (gemm_quant.py); None: dense

    def __post_init__(self):
        _check(self.prologue, self.epilogue)
        if self.split_k < 1:
            raise ValueError(f"split_k {self.split_k}: one or more programs per output tile")
        if self.quant is not None:
            gemm_quant.check(self.quant, self.k, self.block_k)

    @property
    def cache_key(self) -> str:
        prologue = "".join(f"__{op}" for op in self.prologue.ops)
        slices = f"__x{self.epilogue.slices}" if self.epilogue.slices > 1 else ""
        epilogue = "__bias" * self.bias + (f"__{'_'.join(self.epilogue.ops)}" if self.epilogue.ops else "")
        body = (self.prologue, self.epilogue)
        quant = f"__q{gemm_quant.key(self.quant)}" if self.quant else ""
        digest = f"__h{hashlib.sha1(repr(body).encode()).hexdigest()[:8]}" if body != (Prologue(), Epilogue()) else ""
        return (
            f"{KIND}__{self.dtype}{quant}{prologue}__n{self.n}__k{self.k}{slices}{epilogue}{digest}"
            f"__b{self.block_m}x{self.block_n}x{self.block_k}g{self.group_m}__w{self.num_warps}s{self.num_stages}"
            + (f"__sk{self.split_k}" if self.split_k > 1 else "")
        )


def _check(prologue: Prologue, epilogue: Epilogue) -> None:
    for operands, layouts in ((prologue.operands, PROLOGUE_LAYOUTS), (epilogue.operands, EPILOGUE_LAYOUTS)):
        for name, layout in operands:
            if layout not in layouts or not re.fullmatch(r"p_\w+", name):
                raise ValueError(f"operand {name} ({layout}): layouts are {layouts}, names p_...")
    names = ["p_x", "p_w", "p_bias", "p_out"] + [n for n, _ in prologue.operands + epilogue.operands]
    if len(set(names)) != len(names):
        raise ValueError(f"operand names repeat: {names}")
    rows_read = prologue.x_layout == "mk_rows" or any(layout == "mk_rows" for _, layout in prologue.operands)
    if prologue.x_layout not in ("mk", "mk_rows") or rows_read != prologue.gather:
        raise ValueError(f"x layout {prologue.x_layout}: a rows operand exactly when something reads through it")
    if epilogue.slices < 1 or not epilogue.outputs:
        raise ValueError("an epilogue reads one or more slices and stores one or more outputs")
    unknown = sorted(set(_calls(prologue) + _calls(epilogue)) - set(helpers_available()))
    if unknown:
        raise ValueError(f"no Triton helper named {', '.join(unknown)} (kiln/runtime/triton_device.py)")


def helpers_available() -> list[str]:
    """The device helpers (kiln.runtime.triton_device) a statement may call."""
    return helper_names()


def _calls(part) -> list[str]:
    """Functions called by a part's statements, other than tl.* and Python's float()."""
    return [f for _, e in part.statements for f in _CALL.findall(e) if f != "float"]


BUCKET_BOUNDS = (16, 128)  # the decode and small buckets' largest row counts


def bucket(m: int) -> str:
    """Tile bucket by row count: decode-like (M <= 16), small (M <= 128), large."""
    return step_support.bucket(m, *BUCKET_BOUNDS)


def choose(
    target: Target, *, dtype: str, m: int, n: int, k: int, epilogue: Epilogue = Epilogue(),
    prologue: Prologue = Prologue(), bias: bool = False, quant: QuantFormat | None = None,
) -> Variant:
    """The variant for about `m` rows (it runs correctly for any M; `m` only picks the tiles).

    On GPUs, BLOCK_N is halved until the main loop's live tiles fit the target's
    `accumulator_values_per_thread` and the epilogue's live tiles fit EPILOGUE_VALUES_PER_THREAD.
    The loop holds one accumulator per slice, plus one tile's worth when it computes prologue
    values (their fp32 blocks). The epilogue holds the accumulators, or one tile plus the loaded
    [M, N] operands, plus one per further output. On mma.sync targets (the tighter accumulator
    budget), slices combined through a helper also halve BLOCK_K (to 32 at least): the dot
    fragments of BLOCK_K 64 beside gelu_tanh(gate) * up spilled on sm_80 at 128x64.

    Filling the GPU (the decode bucket, m <= 16, on a GPU target with `sm_count`, a GEMM of more
    than FILL_MIN_WEIGHTS weights; see `_fill`):
    when the output tiles alone are fewer programs than the target has SMs, BLOCK_N is halved
    (not below MIN_FILL_BLOCK) until they are not; if they still are, K is split (serial
    split-K): split_k is the smallest count with tiles * split_k >= sm_count such that every split
    keeps at least one K block (cdiv(K, BLOCK_K) blocks in splits of cdiv(blocks, split_k), none
    empty), trying BLOCK_K as chosen, then halved down to MIN_FILL_BLOCK, and keeping the widest
    BLOCK_K that reaches the smallest count. A K too short for any such count at BLOCK_K
    MIN_FILL_BLOCK is split into single blocks (the most programs it allows). num_stages then
    drops to what a split's loop of KB blocks can use (KB + 1, at least 2). The small and large
    buckets and the cpu target (no sm_count) never split.

    A quantized W (`quant`) takes the widest BLOCK_K the format's groups allow
    (gemm_quant.fit_block_k), in the tile choice and in the fill; a format the target cannot read
    (fp8e4m3 without `Target.fp8`) raises KilnError.
    """
    tiles = target.tiles(KIND, bucket(m))
    block_m, block_n = tiles.block("BLOCK_M"), tiles.block("BLOCK_N")
    # no K tile wider than K: half-masked tiles only cost registers (16x64x128 spilled at K=64 on sm_100a)
    block_k = min(tiles.block("BLOCK_K"), max(32, next_power_of_2(k)))
    mma_sync = target.is_gpu and (target.accumulator_values_per_thread or 0) < EPILOGUE_VALUES_PER_THREAD
    if mma_sync and epilogue.slices > 1 and _calls(epilogue):
        block_k = max(32, block_k // 2)
    if quant is not None:
        gemm_quant.check_target(quant, target)
        block_k = gemm_quant.fit_block_k(quant, k, block_k)
    loop_tiles = epilogue.slices + bool(prologue.statements)
    loaded = sum(layout == "mn" for _, layout in epilogue.operands)
    epilogue_tiles = max(epilogue.slices, 1 + loaded) + len(epilogue.outputs) - 1
    threads = tiles.num_warps * target.warp_size

    def too_many_values(block_n):
        per_thread = block_m * block_n / threads
        loop_limit, epilogue_limit = target.accumulator_values_per_thread, EPILOGUE_VALUES_PER_THREAD
        return per_thread * loop_tiles > loop_limit or per_thread * epilogue_tiles > epilogue_limit

    while target.is_gpu and block_n > 16 and too_many_values(block_n):
        block_n //= 2
    # a computed prologue's blocks beside three pipeline stages spilled on sm_89 (64x32x32, 4 warps)
    stages = min(tiles.num_stages, 2) if mma_sync and prologue.statements else tiles.num_stages
    split_k = 1
    if bucket(m) == "decode" and target.is_gpu and target.sm_count and epilogue.slices * n * k > FILL_MIN_WEIGHTS:
        fits = (lambda width: gemm_quant.block_k_fits(quant, k, width)) if quant else (lambda width: True)
        block_n, block_k, split_k = _fill(target.sm_count, triton.cdiv(m, block_m), n, k, block_n, block_k, fits)
        if split_k > 1:
            stages = min(stages, max(2, _split_blocks(k, block_k, split_k) + 1))
    return Variant(
        dtype, n, k, epilogue, block_m, block_n, block_k,
        tiles.block("GROUP_M"), tiles.num_warps, stages, prologue, bias, split_k, quant,
    )


def _split_blocks(k: int, block_k: int, split_k: int) -> int:
    """KB: the K blocks of each split (the last split may hold fewer)."""
    return triton.cdiv(triton.cdiv(k, block_k), split_k)


def _fill(sm_count: int, row_tiles: int, n: int, k: int, block_n: int, block_k: int,
          fits=lambda width: True) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, split_k) giving row_tiles * cdiv(n, BLOCK_N) * split_k >= sm_count
    programs where K allows (the rule is `choose`'s docstring's), over the BLOCK_Ks that `fits`."""
    while row_tiles * triton.cdiv(n, block_n) < sm_count and block_n > MIN_FILL_BLOCK:
        block_n //= 2
    tiles = row_tiles * triton.cdiv(n, block_n)
    if tiles >= sm_count:
        return block_n, block_k, 1
    needed = triton.cdiv(sm_count, tiles)
    best = None  # (split_k, -block_k)
    widths = [block_k >> i for i in range(8) if block_k >> i >= MIN_FILL_BLOCK and fits(block_k >> i)] or [block_k]
    for width in widths:
        blocks = triton.cdiv(k, width)
        # no empty split: the blocks in splits of cdiv(blocks, s) make exactly s splits
        fits = [s for s in range(needed, blocks + 1) if triton.cdiv(blocks, triton.cdiv(blocks, s)) == s]
        if fits and (best is None or fits[0] < best[0]):
            best = (fits[0], -width)
    if best is None:  # K is too short to fill the GPU: single-block splits at the narrowest BLOCK_K
        width = widths[-1]
        best = (triton.cdiv(k, width), -width)
    return block_n, -best[1], best[0]


def operands(variant: Variant) -> list[str]:
    """The pointer arguments between p_w and p_out: bias, then the prologue's and the
    epilogue's operands, in kernel-argument order."""
    names = ["p_bias"] if variant.bias else []
    return names + [n for n, _ in variant.prologue.operands] + [n for n, _ in variant.epilogue.operands]


def outputs(variant: Variant) -> list[str]:
    """The output pointer arguments: the epilogue's outputs, then the escaping prologue values."""
    epilogue = ["p_out"] + [f"p_out{j}" for j in range(1, len(variant.epilogue.outputs))]
    return epilogue + [f"p_x_out{j}" for j in range(len(variant.prologue.escaping))]


def scalars(variant: Variant) -> list[str]:
    """Runtime scalar arguments after M: none (norm epsilons are compiled in)."""
    return []


def workspace_arguments(variant: Variant) -> list[str]:
    """The pointer arguments after M of a split-K variant: the fp32 partials
    (`workspace_values`) and the int32 tile counters (`counter_count`, zero on entry and left
    zero on exit); none for an unsplit one."""
    return ["p_partial", "p_counters"] if variant.split_k > 1 else []


def workspace_values(variant: Variant, rows: int) -> int:
    """fp32 values of `p_partial` for a launch over `rows` rows: [split_k, slices, rows, N]; 0 unsplit."""
    return compiled_grid(scratch_source(variant))(rows)[0] if variant.split_k > 1 else 0


def counter_count(variant: Variant, rows: int) -> int:
    """int32 counters of `p_counters` for a launch over `rows` rows: one per output tile; 0 unsplit."""
    return compiled_grid(scratch_source(variant))(rows)[1] if variant.split_k > 1 else 0


def _tiles_source(variant: Variant) -> str:
    return f"cdiv(rows, {variant.block_m}) * {triton.cdiv(variant.n, variant.block_n)}"


def grid_source(variant: Variant) -> str:
    """One program per (BLOCK_M, BLOCK_N) output tile of out: [rows, N], times split_k."""
    split = f" * {variant.split_k}" if variant.split_k > 1 else ""
    return f"lambda rows: ({_tiles_source(variant)}{split},)"


def scratch_source(variant: Variant) -> str | None:
    """A split variant's scratch as a step program's lambda over the rows: (`workspace_values`,
    `counter_count`); None unsplit."""
    if variant.split_k == 1:
        return None
    return f"lambda rows: ({variant.split_k * variant.epilogue.slices * variant.n} * rows, {_tiles_source(variant)})"


# -- rendering --------------------------------------------------------------------------------

def _needed(targets: list[str], defined: dict[str, str]) -> list[str]:
    """The statements (by value name) that `targets` need, in definition order."""
    need, stack = set(), [t for t in targets if t in defined]
    while stack:
        name = stack.pop()
        if name not in need:
            need.add(name)
            stack += [v for v in _VALUE.findall(defined[name]) if v in defined]
    return [name for name in defined if name in need]


def _block_load(name: str, layout: str, raw: bool, advancing: bool) -> str:
    """A prologue operand's [BLOCK_M, BLOCK_K] block (or [1, BLOCK_K] vector) at K block i_k;
    `advancing`: its tile pointer moves along K with the loop (the main loop's)."""
    if layout in ("mk", "mk_rows"):
        at = "" if advancing else " + i_k * BLOCK_K"
        load = f"tl.load({name}_tile{at}, mask=mask_k[None, :], other=0.0)"
    elif layout == "k":
        return f"tl.load({name} + i_k * BLOCK_K + o_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]"
    else:
        raise AssertionError(layout)
    return load if raw else f"{load}.to(tl.float32)"


def _invariant_load(name: str, layout: str) -> str:
    """Loads that do not depend on the K block or the [M, N] tile: rows and scalars."""
    if layout == "m":
        return f"tl.load({name} + o_m % M).to(tl.float32)[:, None]"
    if layout == "s":
        return f"tl.load({name}).to(tl.float32)"
    raise AssertionError(layout)


def _phase_lines(prologue: Prologue, targets: list[str], raw_x: bool, advancing: bool = False) -> list[str]:
    """Loads and statements of one pass over K that computes `targets` per K block."""
    defined = dict(prologue.statements)
    layouts = {"p_x": prologue.x_layout, **dict(prologue.operands)}
    needed = _needed(targets, defined)
    used = set(targets) | {v for name in needed for v in _VALUE.findall(defined[name])}
    lines = [f"b_{arg[2:]} = {_block_load(arg, layout, raw_x and arg == 'p_x', advancing)}"
             for arg, layout in layouts.items() if f"b_{arg[2:]}" in used and layout in ("mk", "mk_rows", "k")]
    return lines + [f"{name} = {defined[name]}" for name in needed]


def _render_params(variant: Variant) -> dict:
    p, e = variant.prologue, variant.epilogue
    plain_x = p.x == "b_x" and not p.statements
    passes = [{"lines": _phase_lines(p, [value], False), "value": value, "eps": eps,
               "masked": value in dict(p.statements)} for value, eps in p.norms]
    main = _phase_lines(p, [p.x, *p.escaping], plain_x, advancing=True)
    invariant = [f"b_{n[2:]} = {_invariant_load(n, lay)}" for n, lay in p.operands if lay in ("m", "s")]
    read = " ".join(main + [line for q in passes for line in q["lines"]])
    tiles = [f"{n}_tile = {n} + {'o_x_rows' if lay == 'mk_rows' else 'o_rows'}[:, None] * K + o_k[None, :]"
             for n, lay in [("p_x", p.x_layout), *p.operands] if lay in ("mk", "mk_rows") and f"{n}_tile" in read]
    epilogue_loads = {
        "mn": "tl.load({} + o_out, mask=mask_out, other=0.0).to(tl.float32)",
        "n": "tl.load({} + o_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]",
        "m": "tl.load({} + o_m % M).to(tl.float32)[:, None]",
        "s": "tl.load({}).to(tl.float32)",
    }
    text = " ".join(x for _, x in p.statements + e.statements)
    return dict(
        operands=operands(variant), outputs=outputs(variant), prologue=p, epilogue=e,
        helpers=sorted(set(_calls(p) + _calls(e))), gather=p.gather,
        accumulators=[accumulator(j) for j in range(e.slices)], passes=passes, main_lines=main,
        invariant_lines=tiles + invariant,
        advancing=[t.split(" = ")[0] for t in tiles if t.split(" = ")[0] in " ".join(main)],
        x_value=p.x if not plain_x else "b_x", plain_x=plain_x,
        escaping=list(zip(outputs(variant)[len(e.outputs):], p.escaping)),
        epilogue_lines=[f"b_{n[2:]} = {epilogue_loads[lay].format(n)}" for n, lay in e.operands if f"b_{n[2:]}" in text]
        + [f"{name} = {expression}" for name, expression in e.statements],
        stores=list(zip(outputs(variant), e.outputs)), dot_options=DOT_OPTIONS[variant.dtype],
        split_k=variant.split_k, quant=variant.quant is not None,
        **(gemm_quant.render_params(variant.quant, variant.k, variant.block_k, e.slices) if variant.quant
           else dict(quant_setup=[], quant_block=[], quant_slices=[])),
    )


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, **_render_params(variant))


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    tensor = pointer(variant.dtype)
    extra = {name: pointer("i32") if name == "p_rows" else tensor for name in operands(variant)}
    outs = dict.fromkeys(outputs(variant), tensor)
    workspace = dict(zip(workspace_arguments(variant), (pointer("fp32"), pointer("i32"))))
    weight = gemm_quant.signature(variant.quant) if variant.quant else {"p_w": tensor}
    return {"p_x": tensor, **weight, **extra, **outs, "M": "i32", **workspace}


def constexprs(variant: Variant) -> dict[str, object]:
    return {
        "N": variant.n, "K": variant.k, "BLOCK_M": variant.block_m, "BLOCK_N": variant.block_n,
        "BLOCK_K": variant.block_k, "GROUP_M": variant.group_m,
    } | ({"SPLIT_K": variant.split_k} if variant.split_k > 1 else {}) | (
        {"GROUP": variant.quant.group} if variant.quant else {})


def grid(variant: Variant, rows: int) -> tuple[int]:
    return compiled_grid(grid_source(variant))(rows)


def _expected_layouts(variant: Variant, count: int, x_rows: int) -> dict[str, tuple]:
    n, k, dtype = variant.n, variant.k, TORCH_DTYPES[variant.dtype]
    shapes = {"mk": ((count, k), (k, 1)), "mk_rows": ((x_rows, k), (k, 1)), "k": ((k,), (1,)),
              "m": ((count, 1), (1, 1)), "s": ((), ()), "rows": ((count,), (1,)), "mn": ((count, n), (n, 1)),
              "n": ((n,), (1,))}
    layouts = dict(variant.prologue.operands + variant.epilogue.operands)
    expected = {name: (*shapes[layout], torch.int32 if layout == "rows" else dtype) for name, layout in layouts.items()}
    if variant.bias:
        expected["p_bias"] = ((variant.epilogue.slices * n,), (1,), dtype)
    return expected


def launch(
    variant: Variant, x: torch.Tensor, weight: torch.Tensor | QuantizedTensor, *operand_tensors: torch.Tensor,
    bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """x: [R, K] (R = M, or any count when x is read through the row gather); weight:
    [slices*N, K] (a QuantizedTensor in `variant.quant` when that is set); bias: [slices*N]
    (variant.bias); operand_tensors: the prologue's and the epilogue's operands in `operands`
    order (bias excluded), each in its layout's shape;
    out: [M, N] (the first output). A split-K variant's (partials, counters) (fp32
    [>= workspace_values], int32 [>= counter_count], the counters zero) are allocated here unless
    `workspace` gives them. Returns out, or (out, *other outputs) when there are several."""
    dtype, n, k = TORCH_DTYPES[variant.dtype], variant.n, variant.k
    names = [name for name in operands(variant) if name != "p_bias"]
    if len(operand_tensors) != len(names) or (bias is not None) != variant.bias:
        raise ValueError(f"{variant.cache_key}: expects operands {names}, " + ("and" if variant.bias else "no") + " bias")
    given = dict(zip(names, operand_tensors), **({"p_bias": bias} if variant.bias else {}))
    layouts = dict(variant.prologue.operands)
    count = given["p_rows"].shape[0] if variant.prologue.gather else x.shape[0]
    expected = _expected_layouts(variant, count, x.shape[0])
    check_layout("x", x, (x.shape[0] if variant.prologue.x_layout == "mk_rows" else count, k), (k, 1), dtype)
    if variant.quant is None:
        weights = (weight,)
        check_layout("weight", weight, (variant.epilogue.slices * n, k), (k, 1), dtype)
    else:
        weights = gemm_quant.check_weight(variant.quant, weight, variant.epilogue.slices * n, k)
    for name, tensor in given.items():
        if layouts.get(name) == "mk_rows":  # any row count, as x's
            expected[name] = ((tensor.shape[0], k), (k, 1), dtype)
        check_layout(name[2:], tensor, *expected[name])
    out = torch.empty(count, n, dtype=dtype, device=x.device) if out is None else out
    check_layout("out", out, (count, n), (n, 1), dtype)
    extra_outs = [torch.empty(count, n, dtype=dtype, device=x.device) for _ in variant.epilogue.outputs[1:]]
    extra_outs += [torch.empty(count, k, dtype=dtype, device=x.device) for _ in variant.prologue.escaping]
    if workspace is None:
        workspace = (torch.empty(workspace_values(variant, count), dtype=torch.float32, device=x.device),
                     torch.zeros(counter_count(variant, count), dtype=torch.int32, device=x.device))
    partial, counters = workspace
    if (partial.dtype, counters.dtype) != (torch.float32, torch.int32) or partial.numel() < workspace_values(
            variant, count) or counters.numel() < counter_count(variant, count):
        raise ValueError(f"{variant.cache_key}: workspace needs fp32 [{workspace_values(variant, count)}] and "
                         f"int32 [{counter_count(variant, count)}]")
    if count:
        load(variant).kernel[grid(variant, count)](
            x, *weights, *(given[name] for name in operands(variant)), out, *extra_outs, count,
            *(partial, counters)[:len(workspace_arguments(variant))], **constexprs(variant),
            num_warps=variant.num_warps, num_stages=variant.num_stages,
        )
    return (out, *extra_outs) if extra_outs else out
