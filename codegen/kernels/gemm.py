"""GEMM / GEMV: out[M, N] = epilogue(prologue(...) @ W^T), W stored [S*N, K] (nn.Linear layout).

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
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
import triton

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, load_source, next_power_of_2, pointer, render_kernel, triton_helpers
from kiln.codegen.targets import Target

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

    def __post_init__(self):
        _check(self.prologue, self.epilogue)

    @property
    def cache_key(self) -> str:
        prologue = "".join(f"__{op}" for op in self.prologue.ops)
        slices = f"__x{self.epilogue.slices}" if self.epilogue.slices > 1 else ""
        epilogue = "__bias" * self.bias + (f"__{'_'.join(self.epilogue.ops)}" if self.epilogue.ops else "")
        body = (self.prologue, self.epilogue)
        digest = f"__h{hashlib.sha1(repr(body).encode()).hexdigest()[:8]}" if body != (Prologue(), Epilogue()) else ""
        return (
            f"{KIND}__{self.dtype}{prologue}__n{self.n}__k{self.k}{slices}{epilogue}{digest}"
            f"__b{self.block_m}x{self.block_n}x{self.block_k}g{self.group_m}__w{self.num_warps}s{self.num_stages}"
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
        raise ValueError(f"no Triton helper named {', '.join(unknown)} (codegen/kernels/triton_helpers.py)")


def helpers_available() -> list[str]:
    """The device helpers (triton_helpers) a statement may call."""
    return [n for n, v in vars(triton_helpers).items() if isinstance(v, triton_helpers.DeviceHelper)]


def _calls(part) -> list[str]:
    """Functions called by a part's statements, other than tl.* and Python's float()."""
    return [f for _, e in part.statements for f in _CALL.findall(e) if f != "float"]


def bucket(m: int) -> str:
    """Tile bucket by row count: decode-like (M <= 16), small (M <= 128), large."""
    if m <= 16:
        return "decode"
    return "small" if m <= 128 else "large"


def choose(
    target: Target, *, dtype: str, m: int, n: int, k: int, epilogue: Epilogue = Epilogue(),
    prologue: Prologue = Prologue(), bias: bool = False,
) -> Variant:
    """The variant for about `m` rows (it runs correctly for any M; `m` only picks the tiles).

    On GPUs, BLOCK_N is halved until the main loop's live tiles fit the target's
    `accumulator_values_per_thread` and the epilogue's live tiles fit EPILOGUE_VALUES_PER_THREAD.
    The loop holds one accumulator per slice, plus one tile's worth when it computes prologue
    values (their fp32 blocks). The epilogue holds the accumulators, or one tile plus the loaded
    [M, N] operands, plus one per further output. On mma.sync targets (the tighter accumulator
    budget), slices combined through a helper also halve BLOCK_K (to 32 at least): the dot
    fragments of BLOCK_K 64 beside gelu_tanh(gate) * up spilled on sm_80 at 128x64.
    """
    tiles = target.tiles(KIND, bucket(m))
    block_m, block_n = tiles.block("BLOCK_M"), tiles.block("BLOCK_N")
    # no K tile wider than K: half-masked tiles only cost registers (16x64x128 spilled at K=64 on sm_100a)
    block_k = min(tiles.block("BLOCK_K"), max(32, next_power_of_2(k)))
    mma_sync = target.is_gpu and (target.accumulator_values_per_thread or 0) < EPILOGUE_VALUES_PER_THREAD
    if mma_sync and epilogue.slices > 1 and _calls(epilogue):
        block_k = max(32, block_k // 2)
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
    return Variant(
        dtype, n, k, epilogue, block_m, block_n, block_k,
        tiles.block("GROUP_M"), tiles.num_warps, stages, prologue, bias,
    )


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
    )


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, **_render_params(variant))


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    tensor = pointer(variant.dtype)
    extra = {name: pointer("i32") if name == "p_rows" else tensor for name in operands(variant)}
    outs = dict.fromkeys(outputs(variant), tensor)
    return {"p_x": tensor, "p_w": tensor, **extra, **outs, "M": "i32"}


def constexprs(variant: Variant) -> dict[str, object]:
    return {
        "N": variant.n, "K": variant.k, "BLOCK_M": variant.block_m, "BLOCK_N": variant.block_n,
        "BLOCK_K": variant.block_k, "GROUP_M": variant.group_m,
    }


def grid(variant: Variant, rows: int) -> tuple[int]:
    """One program per (BLOCK_M, BLOCK_N) output tile of out: [rows, N]."""
    return (triton.cdiv(rows, variant.block_m) * triton.cdiv(variant.n, variant.block_n),)


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
    variant: Variant, x: torch.Tensor, weight: torch.Tensor, *operand_tensors: torch.Tensor,
    bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """x: [R, K] (R = M, or any count when x is read through the row gather); weight:
    [slices*N, K]; bias: [slices*N] (variant.bias); operand_tensors: the prologue's and the
    epilogue's operands in `operands` order (bias excluded), each in its layout's shape;
    out: [M, N] (the first output). Returns out, or (out, *other outputs) when there are several."""
    dtype, n, k = TORCH_DTYPES[variant.dtype], variant.n, variant.k
    names = [name for name in operands(variant) if name != "p_bias"]
    if len(operand_tensors) != len(names) or (bias is not None) != variant.bias:
        raise ValueError(f"{variant.cache_key}: expects operands {names}, " + ("and" if variant.bias else "no") + " bias")
    given = dict(zip(names, operand_tensors), **({"p_bias": bias} if variant.bias else {}))
    layouts = dict(variant.prologue.operands)
    count = given["p_rows"].shape[0] if variant.prologue.gather else x.shape[0]
    expected = _expected_layouts(variant, count, x.shape[0])
    check_layout("x", x, (x.shape[0] if variant.prologue.x_layout == "mk_rows" else count, k), (k, 1), dtype)
    check_layout("weight", weight, (variant.epilogue.slices * n, k), (k, 1), dtype)
    for name, tensor in given.items():
        if layouts.get(name) == "mk_rows":  # any row count, as x's
            expected[name] = ((tensor.shape[0], k), (k, 1), dtype)
        check_layout(name[2:], tensor, *expected[name])
    out = torch.empty(count, n, dtype=dtype, device=x.device) if out is None else out
    check_layout("out", out, (count, n), (n, 1), dtype)
    extra_outs = [torch.empty(count, n, dtype=dtype, device=x.device) for _ in variant.epilogue.outputs[1:]]
    extra_outs += [torch.empty(count, k, dtype=dtype, device=x.device) for _ in variant.prologue.escaping]
    if count:
        load(variant).kernel[grid(variant, count)](
            x, weight, *(given[name] for name in operands(variant)), out, *extra_outs, count, **constexprs(variant),
            num_warps=variant.num_warps, num_stages=variant.num_stages,
        )
    return (out, *extra_outs) if extra_outs else out
