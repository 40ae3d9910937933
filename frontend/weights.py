"""Mapping checkpoint tensors onto a spec's parameters, written as data.

A spec lists rules in `WEIGHTS`. Two kinds:

- source rules say which checkpoint tensors make a spec parameter: `Concat(target, sources,
  dim)` concatenates several (q/k/v into qkv_proj, gate/up into gate_up_proj), `Slice(target,
  source, dim, start, stop)` takes part of one, `Stack(target, sources, dim)` stacks per-expert
  tensors into [experts, ...] (a mixture's experts). A parameter no source rule targets is read
  under its own name; the first matching source rule wins.
- transform rules then change that value, each matching rule in the order listed:
  `AddConstant(targets, value)` (Gemma's norms store w for a `1 + w` scale), `Transpose(targets)`,
  `Deinterleave(targets)` (GPT-OSS stores gate and up interleaved), `Regroup(targets, groups,
  sizes)` (parts stored interleaved by head group), `Cast(targets, dtype)` (do the following steps
  in that dtype).

In patterns, `*` stands for a layer index (`model.layers.*.mlp.gate_up_proj.weight`); a transform
rule takes one pattern or a tuple of them. The loader casts the final value to the model's dtype.
Tied parameters (the spec shares one nn.Parameter between two modules) are loaded once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from kiln.errors import KilnError
from kiln.quant import QuantFormat, QuantizedTensor


def _groups(pattern: str, name: str) -> tuple[str, ...] | None:
    """The layer indices the `*`s of `pattern` match in `name`, or None if it does not match."""
    found = re.match("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$", name)
    return found.groups() if found else None


def _fill(pattern: str, indices: tuple[str, ...]) -> str:
    parts = pattern.split("*")
    return parts[0] + "".join(i + p for i, p in zip(indices, parts[1:]))


# ---- source rules: which checkpoint tensors make a spec parameter


@dataclass(frozen=True)
class Concat:
    """Spec parameter `target` = torch.cat([checkpoint[s] for s in sources], dim)."""

    target: str
    sources: tuple[str, ...]
    dim: int = 0

    def match(self, name: str) -> tuple[str, ...] | None:
        """The checkpoint names for spec parameter `name`, or None if this rule is not for it.
        Each `*` of a source takes the layer index matched by the same `*` of the target."""
        found = _groups(self.target, name)
        return None if found is None else tuple(_fill(source, found) for source in self.sources)

    def build(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


@dataclass(frozen=True)
class Slice:
    """Spec parameter `target` = checkpoint[source] restricted to [start:stop] along `dim`
    (stop None: to the end), e.g. one projection out of a checkpoint's fused one."""

    target: str
    source: str
    dim: int
    start: int
    stop: int | None = None

    def match(self, name: str) -> tuple[str, ...] | None:
        found = _groups(self.target, name)
        return None if found is None else (_fill(self.source, found),)

    def build(self, parts: list[torch.Tensor]) -> torch.Tensor:
        (x,) = parts
        size = x.shape[self.dim]
        stop = size if self.stop is None else self.stop
        if not 0 <= self.start < stop <= size:
            raise KilnError(f"weight rule {self} cuts [{self.start}:{stop}] out of a dim of size {size}: "
                            "config.json does not match the weights")
        return x.narrow(self.dim, self.start, stop - self.start)


@dataclass(frozen=True)
class Stack:
    """Spec parameter `target` [E, ...] = stack over experts e = 0, 1, .. of the concatenation along
    `dim` of `sources`, whose `#` stands for the expert index: the experts are the indices the
    checkpoint holds, counted from 0 (load_weights checks their number against the spec). A
    checkpoint that already holds `target` itself, stacked, is read as it is."""

    target: str
    sources: tuple[str, ...]
    dim: int = 0

    def match(self, name: str, available: Mapping[str, object]) -> tuple[str, ...] | None:
        found = _groups(self.target, name)
        if found is None:
            return None
        if name in available:
            return (name,)
        sources = tuple(_fill(source, found) for source in self.sources)
        count = 0
        while all(s.replace("#", str(count)) in available for s in sources):
            count += 1
        return tuple(s.replace("#", str(e)) for e in range(max(count, 1)) for s in sources)

    def build(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) == 1 and parts[0].dim() == 3:  # stacked in the checkpoint already
            return parts[0]
        per_expert = len(self.sources)
        return torch.stack([torch.cat(parts[i:i + per_expert], dim=self.dim)
                            for i in range(0, len(parts), per_expert)])


# ---- transform rules: applied in order to the value a source rule (or a plain read) produced


@dataclass(frozen=True)
class _Transform:
    targets: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))

    def applies(self, name: str) -> bool:
        return any(_groups(t, name) is not None for t in self.targets)


@dataclass(frozen=True)
class AddConstant(_Transform):
    """x + value, computed in at least fp32 (Gemma's RMSNorm scales by `1 + w` in fp32)."""

    value: float = 0.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32)) + self.value


@dataclass(frozen=True)
class Transpose(_Transform):
    """x.transpose(dim0, dim1) (a checkpoint that stores a matrix as [in, out])."""

    dim0: int = 0
    dim1: int = 1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


@dataclass(frozen=True)
class Deinterleave(_Transform):
    """Along the last dim, the even entries then the odd ones: [g0, u0, g1, u1, ..] -> [g0, g1, .., u0,
    u1, ..] (a gate/up projection stored interleaved, as GPT-OSS's)."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


@dataclass(frozen=True)
class Regroup(_Transform):
    """Along dim 0, `groups` groups of parts of `sizes` rows each -> every group's first part, then
    every group's second part, ...: [a0, b0, a1, b1, ..] -> [a0, a1, .., b0, b1, ..] (Qwen3-Next
    stores its q/k/v/z projection grouped by key head; kiln reads q, k, v, z as contiguous blocks)."""

    groups: int = 1
    sizes: tuple[int, ...] = ()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.reshape(self.groups, sum(self.sizes), *x.shape[1:]).split(list(self.sizes), dim=1)
        return torch.cat([part.reshape(-1, *x.shape[1:]) for part in parts])


@dataclass(frozen=True)
class Cast(_Transform):
    """x.to(dtype): the later steps of the chain work in `dtype` (the loader still casts the
    result to the model's dtype)."""

    dtype: torch.dtype = torch.float32

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


SourceRule = Concat | Slice | Stack
TransformRule = AddConstant | Transpose | Deinterleave | Regroup | Cast
WeightRule = SourceRule | TransformRule


def _source_rule(name: str, rules: tuple[WeightRule, ...],
                 available: Mapping[str, object]) -> tuple[SourceRule | None, tuple[str, ...]]:
    for rule in rules:
        if isinstance(rule, (Concat, Slice, Stack)):
            sources = rule.match(name, available) if isinstance(rule, Stack) else rule.match(name)
            if sources is not None:
                return rule, sources
    return None, (name,)


def checkpoint_sources(name: str, rules: tuple[WeightRule, ...],
                       available: Mapping[str, object] | None = None) -> tuple[tuple[str, ...], int]:
    """The checkpoint tensors that make spec parameter `name` (of those `available`, for a `Stack`),
    and the dim they concatenate (or, for a `Slice`, are cut) on."""
    rule, sources = _source_rule(name, rules, available or {})
    return sources, (rule.dim if rule is not None else 0)


def weight_value(name: str, rules: tuple[WeightRule, ...], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Spec parameter `name` from checkpoint `tensors`: its source rule (or a plain read), then
    every transform rule that matches it, in order. Raises KilnError naming a missing tensor."""
    rule, sources = _source_rule(name, rules, tensors)
    parts = []
    for source in sources:
        if source not in tensors:
            raise KilnError(f"the checkpoint has no tensor {source!r} (needed for {name!r}); "
                            "check that config.json matches the weight files")
        parts.append(tensors[source])
    value = rule.build(parts) if rule is not None else parts[0]
    for transform in rules:
        if not isinstance(transform, (Concat, Slice, Stack)) and transform.applies(name):
            value = transform.apply(value)
    return value


def stored_formats(spec: nn.Module, rules: tuple[WeightRule, ...],
                   formats: Mapping[str, QuantFormat]) -> dict[str, QuantFormat]:
    """The spec parameters that can be loaded still quantized, and their format: those read whole
    from checkpoint tensors stored quantized (`formats`: checkpoint name -> format) in one
    format, or rows of them (a `Concat` or `Slice` on dim 0), that no transform rule changes."""
    kept = {}
    for name, _ in spec.named_parameters():
        rule, sources = _source_rule(name, rules, formats)
        if rule is not None and (isinstance(rule, Stack) or rule.dim != 0):
            continue
        if any(not isinstance(t, (Concat, Slice, Stack)) and t.applies(name) for t in rules):
            continue
        found = {formats.get(source) for source in sources}
        if len(found) == 1 and None not in found:
            kept[name] = found.pop()
    return kept


def _quantized_value(name: str, rules: tuple[WeightRule, ...],
                     quantized: Mapping[str, Callable[[], QuantizedTensor]]) -> QuantizedTensor:
    """Spec parameter `name`, one that `stored_formats` keeps, read quantized."""
    rule, sources = _source_rule(name, rules, quantized)
    parts = [quantized[source]() for source in sources]
    if isinstance(rule, Slice):
        return parts[0].rows(slice(rule.start, rule.stop))
    return QuantizedTensor.cat(parts) if len(parts) > 1 else parts[0]


def load_weights(
    spec: nn.Module,
    rules: tuple[WeightRule, ...],
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    progress: bool = True,
    quantized: Mapping[str, Callable[[], QuantizedTensor]] | None = None,
    keep: Collection[str] = (),
) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The spec's parameters (by their canonical names) built from checkpoint `tensors` by
    `rules`, cast to `dtype`; those named in `keep` (see `stored_formats`) read through the
    checkpoint's `quantized` loaders and left quantized. Raises KilnError naming any missing
    tensor or mismatched shape."""
    weights: dict[str, torch.Tensor | QuantizedTensor] = {}
    params = list(spec.named_parameters())
    for name, param in tqdm(params, desc="mapping weights", unit="tensor", disable=not progress):
        if name in keep:
            weights[name] = _quantized_value(name, rules, quantized or {})
            if tuple(weights[name].shape) != tuple(param.shape):
                raise KilnError(f"quantized checkpoint tensor(s) for {name!r} have shape {weights[name].shape}, "
                                f"but it needs {tuple(param.shape)}: config.json does not match the weights")
            continue
        weight = weight_value(name, rules, tensors)
        if tuple(weight.shape) != tuple(param.shape):
            sources, _ = checkpoint_sources(name, rules, tensors)
            raise KilnError(f"checkpoint tensor(s) {sources} have shape {tuple(weight.shape)}, "
                            f"but {name!r} needs {tuple(param.shape)}: config.json does not match the weights")
        weights[name] = weight.to(dtype).contiguous()
    return weights


def random_weights(spec: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 random weights for every spec parameter (tests, benchmarks without a checkpoint):
    matrices ~ N(0, 1/fan_in), vectors (norms, biases) near 1, so that folding a norm weight
    changes the numbers."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, p in spec.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        weights[name] = 1 + 0.2 * noise if p.dim() == 1 else noise / p.shape[-1] ** 0.5
    return weights
