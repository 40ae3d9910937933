"""How the tracer turns torch calls into IR ops.

Most calls map through the op registry (`ir/ops.py`): each op names the torch functions and
`Tensor` methods that mean it and its torch signature, so `torch.softmax(x, dim=-1)`,
`x.softmax(-1)` and `F.softmax(x, -1)` all bind to `softmax(x, dim=-1)` here without any code per
op. A Python scalar where the signature wants a tensor becomes a `const` of the other inputs'
dtype; a `dtype=` keyword (softmax, sum, cumsum, ...) casts the input first.

The forms that are not one registry op live below: shape views (view/reshape/flatten/
unflatten/unsqueeze/squeeze/split/chunk/contiguous), casts (`to`, `float`, `type_as`, ...),
`stack` (reshapes + cat), `max`/`min` (a maximum, or the (values, indices) pair along a dim),
`F.gelu` (erf or tanh), `F.layer_norm`, `F.rms_norm` and indexing with plain slices.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.nn.functional as F

from kiln.ir import OPS, GraphBuilder, Node, OpDef
from kiln.ir.types import DTYPES, dtype_name

_FUNCTIONS: dict[object, OpDef] = {}
_METHODS: dict[str, OpDef] = {}
_INDEXED_OPS: set[str] = set()  # the registry's op names when the two dicts above were built
_REQUIRED = object()


def _index_registry() -> None:
    _FUNCTIONS.clear()
    _METHODS.clear()
    _INDEXED_OPS.clear()
    _INDEXED_OPS.update(OPS)
    for op in OPS.values():
        for spelling in op.torch:
            (_METHODS if isinstance(spelling, str) else _FUNCTIONS)[spelling] = op


class Unsupported(Exception):
    """A call the tracer cannot express (the message says what to use instead)."""


def lookup(target, is_method: bool) -> OpDef | None:
    """The registry op a torch function (or `Tensor` method name) means, if any (the index is
    rebuilt when the registry changed: an op registered by a spec is found at once)."""
    if _INDEXED_OPS != set(OPS):
        _index_registry()
    return _METHODS.get(target) if is_method else _FUNCTIONS.get(target)


def bind(b: GraphBuilder, op: OpDef, args: tuple, kwargs: dict) -> Node:
    """Emits `op` for a torch call with `args`/`kwargs` (IR nodes, scalars, lists)."""
    kwargs = dict(kwargs)
    cast_to = kwargs.pop("dtype", None)
    kwargs.pop("_stacklevel", None)  # F.softmax's bookkeeping
    if kwargs.pop("inplace", False):
        raise Unsupported(f"{op.name}(inplace=True): a spec computes new values; drop inplace")
    names = op.signature
    if len(args) > len(names):
        raise Unsupported(f"{op.name} takes at most {len(names)} arguments ({', '.join(n.lstrip('%') for n in names)})")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        name = key if key in names else f"%{key}"
        if name not in names or name in bound:
            raise Unsupported(f"{op.name} does not take the keyword {key!r} here "
                              f"(it takes {', '.join(n.lstrip('%') for n in names)})")
        bound[name] = value
    tensors = [bound.get(n, _REQUIRED) for n in names if n.startswith("%")]
    if op.variadic:
        tensors = list(tensors[0])
    attrs = {}
    for name in op.attr_names:
        value = bound.get(name, op.defaults.get(name, _REQUIRED))
        if value is _REQUIRED:
            raise Unsupported(f"{op.name} needs its argument {name!r}")
        if isinstance(value, Node):
            raise Unsupported(f"{op.name}'s {name!r} must be a Python constant, not a tensor")
        attrs[name] = value
    if any(t is _REQUIRED for t in tensors):
        raise Unsupported(f"{op.name} needs every tensor argument ({', '.join(n for n in names if n.startswith('%'))})")
    nodes = [t for t in tensors if isinstance(t, Node)]
    if not nodes:
        raise Unsupported(f"{op.name} of Python scalars only: compute constants in Python")
    # a scalar takes the dtype of the other operands (where's condition aside; torch's default float)
    dtype = next((t.type.dtype for t in nodes if t.type.dtype != "bool"), "f32")
    inputs = [t if isinstance(t, Node) else b.op("const", value=float(t), dtype=dtype) for t in tensors]
    if cast_to is not None:
        inputs[0] = b.op("cast", inputs[0], dtype=dtype_name(cast_to))
    if "dim" in attrs and isinstance(attrs["dim"], int):
        attrs["dim"] = attrs["dim"] % inputs[0].type.rank if inputs[0].type.rank else 0
    return b.op(op.name, *inputs, **attrs)


# ---- forms that are not one registry op

def reshape(b: GraphBuilder, x: Node, shape) -> Node:
    shape = [sympy.sympify(d) for d in shape]
    if any(d == -1 for d in shape):
        known = sympy.Mul(*[d for d in shape if d != -1])
        shape = [sympy.simplify(x.type.numel / known) if d == -1 else d for d in shape]
    return b.op("reshape", x, shape=tuple(shape))


def _shape_args(rest) -> list:
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else list(rest)


def _unsqueeze(b, x, dim):
    dim = dim % (x.type.rank + 1)
    return reshape(b, x, x.type.shape[:dim] + (1,) + x.type.shape[dim:])


def _squeeze(b, x, dim=None):
    dims = range(x.type.rank) if dim is None else [dim % x.type.rank]
    return reshape(b, x, [d for i, d in enumerate(x.type.shape) if not (i in dims and d == 1)])


def split(b: GraphBuilder, x: Node, how: str, arg, dim: int = 0) -> list[Node]:
    dim = dim % x.type.rank
    size = int(x.type.shape[dim])
    sizes = [size // arg] * arg if how == "chunk" else ([arg] * (size // arg) if isinstance(arg, int) else list(arg))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [b.op("slice", x, dim=dim, start=s, stop=s + z) for s, z in zip(starts, sizes)]


def _cast(b, x, dtype):
    if isinstance(dtype, Node):  # type_as
        dtype = dtype.type.torch_dtype
    if not isinstance(dtype, torch.dtype):
        raise Unsupported(f"to({dtype!r}): kiln specs move no tensors between devices; only dtype casts trace")
    if dtype not in DTYPES.values():
        raise Unsupported(f"a cast to {dtype}: kiln's dtypes are {', '.join(map(str, DTYPES.values()))}")
    return b.op("cast", x, dtype=dtype_name(dtype))


def _max_min(b, which: str, x, other=None, keepdim=False, *, dim=None):
    """max(x, y) = maximum; max(x, dim[, keepdim]) = [amax, argmax] (a list, like torch's pair)."""
    if isinstance(other, Node):
        return b.op({"max": "maximum", "min": "minimum"}[which], x, other)
    dim = other if dim is None else dim
    if dim is None:
        raise Unsupported(f"{which}(x) over all elements: use {which}(x, dim) or torch.a{which}(x, dim)")
    dim %= x.type.rank
    return [b.op(f"a{which}", x, dim=dim, keepdim=keepdim), b.op(f"arg{which}", x, dim=dim, keepdim=keepdim)]


def _gelu(b, x, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"gelu(approximate={approximate!r}): torch knows 'none' and 'tanh'")
    return b.op("gelu_tanh" if approximate == "tanh" else "gelu", x)


def _layer_norm(b, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if len(normalized_shape) != 1:
        raise Unsupported("layer_norm over more than the last dim: reshape so that it normalizes the last dim")
    if bias is not None and weight is None:
        raise Unsupported("layer_norm with a bias but no weight: pass a weight of ones")
    affine = [a for a in (weight, bias) if a is not None]
    return b.op("layer_norm", x, *affine, eps=float(eps), weight=weight is not None, bias=bias is not None)


def _rms_norm(b, x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1 or eps is None:
        raise Unsupported("F.rms_norm needs the last dim as normalized_shape and an explicit eps")
    return b.op("rms_norm", x, *([weight] if weight is not None else []), eps=float(eps))


def _stack(b, tensors, dim=0):
    return b.op("cat", *[_unsqueeze(b, t, dim) for t in tensors], dim=dim % (tensors[0].type.rank + 1))


def getitem(b: GraphBuilder, x, index):
    """x[index]: an element of a list (split, max) or multi-output node (topk), or plain slices."""
    if isinstance(x, (list, tuple)):
        return x[index]
    if x.op in ("topk", "sort"):
        return b.op("get", x, index=index)
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (x.type.rank - len(index) + 1) + index[at + 1:]
    dim = 0
    for s in index:
        if s is None:
            x = _unsqueeze(b, x, dim)
            dim += 1
            continue
        if isinstance(s, int):  # x[i]: a slice of one, then the dim dropped
            size = x.type.shape[dim]
            if s < 0 and not size.is_number:
                raise Unsupported(f"x[{s}] along the symbolic dim {size}: index from the start")
            i = s % int(size) if size.is_number else s
            x = b.op("slice", x, dim=dim, start=i, stop=i + 1)
            x = reshape(b, x, x.type.shape[:dim] + x.type.shape[dim + 1:])
            continue
        if not isinstance(s, slice) or s.step not in (None, 1) or isinstance(s.start, Node) or isinstance(s.stop, Node):
            raise Unsupported(f"indexing with {index!r}: only integers, plain slices a:b, None and ... trace "
                              "(use torch.gather or torch.index_select for tensor indices)")
        if s != slice(None):
            start, stop, _ = s.indices(int(x.type.shape[dim]))
            x = b.op("slice", x, dim=dim, start=start, stop=stop)
        dim += 1
    return x


def _getattr(b, x, name):
    """x.shape (dims: ints, or sympy symbols such as T), x.dtype, and a topk/sort's .values/.indices."""
    if name == "shape":
        return tuple(int(d) if d.is_number else d for d in x.type.shape)
    if name == "dtype":
        return x.type.torch_dtype
    if name in ("values", "indices") and isinstance(x, list):  # max/min along a dim
        return x[("values", "indices").index(name)]
    if name in ("values", "indices") and x.op in ("topk", "sort"):
        return b.op("get", x, index=("values", "indices").index(name))
    raise Unsupported(f"the tensor attribute {name!r} (only .shape, .dtype and topk/sort's .values/.indices trace)")


# Calls that are not one registry op: name -> handler(builder, *args, **kwargs).
FUNCTIONS = {
    torch.stack: _stack, F.gelu: _gelu, F.layer_norm: _layer_norm, F.rms_norm: _rms_norm,
    torch.max: lambda b, *a, **k: _max_min(b, "max", *a, **k), torch.min: lambda b, *a, **k: _max_min(b, "min", *a, **k),
    torch.unsqueeze: _unsqueeze, torch.squeeze: _squeeze, torch.reshape: lambda b, x, shape: reshape(b, x, shape),
    torch.flatten: lambda b, x, start_dim=0, end_dim=-1: _flatten(b, x, start_dim, end_dim),
    torch.split: lambda b, x, arg, dim=0: split(b, x, "split", arg, dim),
    torch.chunk: lambda b, x, arg, dim=0: split(b, x, "chunk", arg, dim),
    operator.getitem: getitem, getattr: _getattr,
}
METHODS = {
    "view": lambda b, x, *shape: reshape(b, x, _shape_args(shape)),
    "reshape": lambda b, x, *shape: reshape(b, x, _shape_args(shape)),
    "flatten": lambda b, x, start_dim=0, end_dim=-1: _flatten(b, x, start_dim, end_dim),
    "unflatten": lambda b, x, dim, sizes: _unflatten(b, x, dim, sizes),
    "unsqueeze": _unsqueeze, "squeeze": _squeeze,
    "contiguous": lambda b, x: x,
    "size": lambda b, x, dim=None: _getattr(b, x, "shape") if dim is None else _getattr(b, x, "shape")[dim],
    "split": lambda b, x, arg, dim=0: split(b, x, "split", arg, dim),
    "chunk": lambda b, x, arg, dim=0: split(b, x, "chunk", arg, dim),
    "to": _cast, "type": _cast, "type_as": _cast,
    "float": lambda b, x: _cast(b, x, torch.float32), "half": lambda b, x: _cast(b, x, torch.float16),
    "bfloat16": lambda b, x: _cast(b, x, torch.bfloat16), "double": lambda b, x: _cast(b, x, torch.float64),
    "long": lambda b, x: _cast(b, x, torch.int64), "int": lambda b, x: _cast(b, x, torch.int32),
    "bool": lambda b, x: _cast(b, x, torch.bool),
    "max": lambda b, *a, **k: _max_min(b, "max", *a, **k), "min": lambda b, *a, **k: _max_min(b, "min", *a, **k),
}


def _flatten(b, x, start_dim, end_dim):
    start, end = start_dim % x.type.rank, end_dim % x.type.rank
    shape = x.type.shape
    return reshape(b, x, shape[:start] + (sympy.Mul(*shape[start:end + 1]),) + shape[end + 1:])


def _unflatten(b, x, dim, sizes):
    dim %= x.type.rank
    return reshape(b, x, x.type.shape[:dim] + tuple(sizes) + x.type.shape[dim + 1:])


def supported_calls() -> str:
    """A short list of what the tracer accepts (for refusals)."""
    if _INDEXED_OPS != set(OPS):
        _index_registry()
    ops = sorted({op.name for op in (*_FUNCTIONS.values(), *_METHODS.values())})
    forms = sorted({*METHODS, "stack", "layer_norm", "gelu"})
    return f"registry ops {', '.join(ops)}; forms {', '.join(forms)}"
