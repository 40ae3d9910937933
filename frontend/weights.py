"""Mapping checkpoint tensors onto a spec's parameters, written as data.

A spec lists rules in `WEIGHTS`. Two kinds:

- source rules say which checkpoint tensors make a spec parameter: `Concat(target, sources,
  dim)` concatenates several (q/k/v into qkv_proj, gate/up into gate_up_proj), `Slice(target,
  source, dim, start, stop)` takes part of one. A parameter no source rule targets is read under
  its own name; the first matching source rule wins.
- transform rules then change that value, each matching rule in the order listed:
  `AddConstant(targets, value)` (Gemma's norms store w for a `1 + w` scale), `Transpose(targets)`,
  `Cast(targets, dtype)` (do the following steps in that dtype).

In patterns, `*` stands for a layer index (`model.layers.*.mlp.gate_up_proj.weight`); a transform
rule takes one pattern or a tuple of them. The loader casts the final value to the model's dtype.
Tied parameters (the spec shares one nn.Parameter between two modules) are loaded once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from kiln.errors import KilnError


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
class Cast(_Transform):
    """x.to(dtype): the later steps of the chain work in `dtype` (the loader still casts the
    result to the model's dtype)."""

    dtype: torch.dtype = torch.float32

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


SourceRule = Concat | Slice
TransformRule = AddConstant | Transpose | Cast
WeightRule = SourceRule | TransformRule


def _source_rule(name: str, rules: tuple[WeightRule, ...]) -> tuple[SourceRule | None, tuple[str, ...]]:
    for rule in rules:
        if isinstance(rule, (Concat, Slice)):
            sources = rule.match(name)
            if sources is not None:
                return rule, sources
    return None, (name,)


def checkpoint_sources(name: str, rules: tuple[WeightRule, ...]) -> tuple[tuple[str, ...], int]:
    """The checkpoint tensors that make spec parameter `name`, and the dim they concatenate (or,
    for a `Slice`, are cut) on."""
    rule, sources = _source_rule(name, rules)
    return sources, (rule.dim if rule is not None else 0)


def weight_value(name: str, rules: tuple[WeightRule, ...], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Spec parameter `name` from checkpoint `tensors`: its source rule (or a plain read), then
    every transform rule that matches it, in order. Raises KilnError naming a missing tensor."""
    rule, sources = _source_rule(name, rules)
    parts = []
    for source in sources:
        if source not in tensors:
            raise KilnError(f"the checkpoint has no tensor {source!r} (needed for {name!r}); "
                            "check that config.json matches the weight files")
        parts.append(tensors[source])
    value = rule.build(parts) if rule is not None else parts[0]
    for transform in rules:
        if not isinstance(transform, (Concat, Slice)) and transform.applies(name):
            value = transform.apply(value)
    return value


def load_weights(
    spec: nn.Module,
    rules: tuple[WeightRule, ...],
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The spec's parameters (by their canonical names) built from checkpoint `tensors` by
    `rules`, cast to `dtype`. Raises KilnError naming any missing tensor or mismatched shape."""
    weights = {}
    params = list(spec.named_parameters())
    for name, param in tqdm(params, desc="mapping weights", unit="tensor", disable=not progress):
        weight = weight_value(name, rules, tensors)
        if tuple(weight.shape) != tuple(param.shape):
            sources, _ = checkpoint_sources(name, rules)
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
