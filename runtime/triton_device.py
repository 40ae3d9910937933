"""The Triton device functions that generated kernels call: the one module a kernel source imports.

An artifact's kernels/<name>.py import this module, and nothing of the compiler, so that
serving an artifact (its binaries on a GPU, or its sources under TRITON_INTERPRET=1) needs
kiln's runtime only; the compiler renders the same sources and cross-compiles them.

Helpers are decorated with `helper`, not `triton.jit`: Triton decides "interpreted or compiled"
when it decorates, and one process may both interpret kernels (TRITON_INTERPRET=1, tests and
CPU verification) and cross-compile them (AOT). A `helper` is a `JITFunction` for the compiler
and, when an interpreted kernel calls it, runs through Triton's interpreter.
"""

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


class DeviceHelper(JITFunction):
    """A `@triton.jit` device function that interpreted kernels can call too."""

    def __call__(self, *args, **kwargs):
        return InterpretedFunction(self.fn)(*args, **kwargs)


def helper(fn) -> DeviceHelper:
    return DeviceHelper(fn)


def helper_names() -> list[str]:
    """The device functions a rendered statement may call (every `helper` of this module)."""
    return [name for name, value in globals().items() if isinstance(value, DeviceHelper)]


@helper
def silu(x):
    """x * sigmoid(x), for fp32 x."""
    return x / (1.0 + tl.exp(-x))


@helper
def tanh(x):
    """tanh from exp (libdevice externs do not run in the interpreter); saturates to +-1."""
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@helper
def gelu_tanh(x):
    """GELU, tanh approximation (PyTorch approximate="tanh"), for fp32 x."""
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


# -- the row kernel's ops (kiln.codegen.kernels.rows): the names the op registry's `triton`
# strings call (ir/ops.py). fp32 blocks; `mask` marks the valid lanes of a row (padded blocks),
# `width` is the number of valid lanes along the reduced (last) axis.


@helper
def gelu_erf(x):
    """GELU, exact erf form (PyTorch's default F.gelu), for fp32 x."""
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@helper
def softplus(x, beta, threshold):
    """torch's softplus: log(1 + exp(beta * x)) / beta, and x itself where beta * x > threshold."""
    z = x * beta
    soft = (tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))) / beta
    return tl.where(z > threshold, x, soft)


@helper
def clamp(x, lo, hi):
    """torch.clamp(x, lo, hi); None leaves that side open."""
    if lo is not None:
        x = tl.maximum(x, lo)
    if hi is not None:
        x = tl.minimum(x, hi)
    return x


@helper
def pow_(x, y):
    """torch.pow(x, y) for fp32 blocks or scalars: exp2(y * log2|x|) with the sign of an odd
    integer power, exact products for the exponents models write (0, 1, 2, 3, 0.5, -1, -2)."""
    x = tl.where(y == y, x, x)  # both operands as blocks, whichever was a Python scalar
    y = tl.where(x == x, y, y)
    magnitude = tl.exp2(y * tl.log2(tl.abs(x)))
    integer = tl.floor(y) == y
    odd = integer & (tl.floor(y * 0.5) * 2.0 != y)
    result = tl.where((x < 0.0) & odd, -magnitude, magnitude)
    result = tl.where((x < 0.0) & ~integer, float("nan"), result)
    result = tl.where(y == 2.0, x * x, result)
    result = tl.where(y == 3.0, x * x * x, result)
    result = tl.where(y == 1.0, x, result)
    result = tl.where(y == 0.5, tl.sqrt(x), result)
    result = tl.where(y == -1.0, 1.0 / x, result)
    result = tl.where(y == -2.0, 1.0 / (x * x), result)
    return tl.where(y == 0.0, 1.0, result)


@helper
def rms_norm_rstd(x, mask, width, eps):
    """1 / sqrt(mean(x^2) + eps) over the valid lanes of each row of x: [L, D] -> [L, 1]."""
    return tl.rsqrt(tl.sum(tl.where(mask, x * x, 0.0), axis=-1, keep_dims=True) / width + eps)


@helper
def rms_norm(x, mask, width, eps):
    """x * rms_norm_rstd(x): the normalized rows (the caller applies the weight)."""
    return x * rms_norm_rstd(x, mask, width, eps)


@helper
def layer_norm_stats(x, mask, width, eps):
    """(mean, 1 / sqrt(var + eps)) over the valid lanes of each row: [L, D] -> two [L, 1]."""
    mean = tl.sum(tl.where(mask, x, 0.0), axis=-1, keep_dims=True) / width
    centered = tl.where(mask, x - mean, 0.0)
    return mean, tl.rsqrt(tl.sum(centered * centered, axis=-1, keep_dims=True) / width + eps)


@helper
def layer_norm(x, mask, width, eps):
    """(x - mean) / sqrt(var + eps) per row (the caller applies weight and bias)."""
    mean, rstd = layer_norm_stats(x, mask, width, eps)
    return (x - mean) * rstd


@helper
def softmax_stats(x, mask):
    """(max, sum of exp(x - max)) over the valid lanes of each row: [L, D] -> two [L, 1]."""
    peak = tl.max(tl.where(mask, x, float("-inf")), axis=-1, keep_dims=True)
    return peak, tl.sum(tl.where(mask, tl.exp(x - peak), 0.0), axis=-1, keep_dims=True)


@helper
def softmax(x, mask):
    """softmax over the valid lanes of each row."""
    peak, total = softmax_stats(x, mask)
    return tl.exp(x - peak) / total


@helper
def log_softmax(x, mask):
    """log_softmax over the valid lanes of each row."""
    peak, total = softmax_stats(x, mask)
    return x - peak - tl.log(total)


# -- paged attention (kiln.codegen.kernels.attention_*): the paged KV cache, block-sparse
# layouts, soft-capping and one online-softmax step; the templates render only what varies.

LOG2E = tl.constexpr(1.4426950408889634)


@helper
def kv_tile_offsets(p_block_table, o_n, m_n, i_kv_head, o_d,
                    PAGE_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Element offsets [BLOCK_N, BLOCK_D] of logical tokens o_n (kv head i_kv_head) in a paged cache.

    p_block_table: the sequence's row of block_tables; cache layout [num_blocks, PAGE_SIZE,
    NUM_KV_HEADS, HEAD_DIM]. Tokens outside m_n never read the block table (its tail is padding).
    """
    b_page = tl.load(p_block_table + o_n // PAGE_SIZE, mask=m_n, other=0).to(tl.int64)
    o_slot = b_page * PAGE_SIZE + o_n % PAGE_SIZE
    return (o_slot * NUM_KV_HEADS + i_kv_head)[:, None] * HEAD_DIM + o_d[None, :]


# -- block-sparse layouts: blocks of LAYOUT_BLOCK tokens; query block i sees key block j <= i when
# i - j < LOCAL_BLOCKS or (j + 1) % VERTICAL_STRIDE == 0. A kernel visits, for its queries, the
# vertical blocks before their local range, then the local range, ceil(LAYOUT_BLOCK / BLOCK_N)
# tiles per block (fewer in the last one): one loop over the tiles `sparse_tiles` counts.


@helper
def sparse_tiles(q_first, q_last, BLOCK_N: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
                 LOCAL_BLOCKS: tl.constexpr, VERTICAL_STRIDE: tl.constexpr):
    """The KV tiles that queries at positions q_first..q_last see between them: the vertical
    blocks before local_block, then blocks local_block .. q_last's block (the local blocks of
    q_first's block up to q_last's: each is seen by some query), keys up to q_last only.
    Returns (num_tiles, vertical_blocks, local_block), scalars for `sparse_tile`.
    """
    TILES_PER_BLOCK: tl.constexpr = (LAYOUT_BLOCK + BLOCK_N - 1) // BLOCK_N
    local_block = tl.maximum(q_first // LAYOUT_BLOCK - LOCAL_BLOCKS + 1, 0)
    last_block = q_last // LAYOUT_BLOCK
    vertical_blocks = local_block // VERTICAL_STRIDE
    num_tiles = ((vertical_blocks + last_block - local_block) * TILES_PER_BLOCK
                 + tl.cdiv(q_last + 1 - last_block * LAYOUT_BLOCK, BLOCK_N))  # the last block: up to q_last
    return num_tiles, vertical_blocks, local_block


@helper
def sparse_tile(i_kv_tile, vertical_blocks, local_block, kv_end, BLOCK_N: tl.constexpr,
                LAYOUT_BLOCK: tl.constexpr, VERTICAL_STRIDE: tl.constexpr):
    """(key_block, n_start, n_stop): tile i_kv_tile of `sparse_tiles` holds keys n_start ..
    min(n_start + BLOCK_N, n_stop) - 1, all in layout block key_block (n_stop: its end, or kv_end)."""
    TILES_PER_BLOCK: tl.constexpr = (LAYOUT_BLOCK + BLOCK_N - 1) // BLOCK_N
    i_block = i_kv_tile // TILES_PER_BLOCK
    key_block = tl.where(i_block < vertical_blocks, (i_block + 1) * VERTICAL_STRIDE - 1,
                         local_block + i_block - vertical_blocks)
    n_start = key_block * LAYOUT_BLOCK + (i_kv_tile - i_block * TILES_PER_BLOCK) * BLOCK_N
    return key_block, n_start, tl.minimum(key_block * LAYOUT_BLOCK + LAYOUT_BLOCK, kv_end)


@helper
def layout_sees(q_block, k_block, LOCAL_BLOCKS: tl.constexpr, VERTICAL_STRIDE: tl.constexpr):
    """Whether query block q_block sees key block k_block <= q_block (the caller masks causality)."""
    return (q_block - k_block < LOCAL_BLOCKS) | ((k_block + 1) % VERTICAL_STRIDE == 0)


@helper
def online_softmax_step(b_s, b_v, b_max, b_sum, b_acc, DOT_PRECISION: tl.constexpr):
    """Folds one KV tile into the flash-attention state (fp32).

    b_s: [M, BLOCK_N] scores (natural units, -inf where not visible); b_v: [BLOCK_N, BLOCK_D].
    State: b_max [M] running max (log2 units), b_sum [M], b_acc [M, BLOCK_D] (unnormalised).
    A row that has seen no visible key keeps max = -inf, sum = 0, acc = 0 (no NaN).
    """
    b_s = b_s * LOG2E
    b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
    b_base = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
    b_p = tl.exp2(b_s - b_base[:, None])
    b_rescale = tl.exp2(b_max - b_base)
    b_sum = b_sum * b_rescale + tl.sum(b_p, 1)
    b_acc = b_acc * b_rescale[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return b_max_new, b_sum, b_acc


@helper
def softcap_scores(b_s, CAP: tl.constexpr):
    """CAP * tanh(b_s / CAP), fp32, within a few ulp of tanh everywhere (no libdevice: it does not
    run in the interpreter). |x| < 0.3: the odd Taylor series to x^11 (2^-24 below the next term);
    else (1 - e^-2|x|) / (1 + e^-2|x|), whose cancellation costs < 2 ulp there.
    """
    b_x = b_s / CAP
    b_abs = tl.abs(b_x)
    b_exp = tl.exp(-2.0 * b_abs)
    b_x2 = b_x * b_x
    b_series = b_abs * (1.0 + b_x2 * (-1.0 / 3.0 + b_x2 * (2.0 / 15.0 + b_x2 * (
        -17.0 / 315.0 + b_x2 * (62.0 / 2835.0 + b_x2 * (-1382.0 / 155925.0))))))
    b_tanh = tl.where(b_abs < 0.3, b_series, (1.0 - b_exp) / (1.0 + b_exp))
    return CAP * tl.where(b_x < 0.0, -b_tanh, b_tanh)
