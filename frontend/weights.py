"""Mapping checkpoint tensors onto a spec's parameters, written as data.

A spec lists `WeightRule`s: `Concat(target, sources, dim)` builds one (packed) spec parameter by
concatenating checkpoint tensors (q/k/v into qkv_proj, gate/up into gate_up_proj); any spec
parameter no rule targets is read under its own name. In patterns, `*` stands for a layer index
(`model.layers.*.mlp.gate_up_proj.weight`). Tied parameters (the spec shares one nn.Parameter
between two modules) are loaded once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from tqdm import tqdm

from kiln.errors import KilnError


@dataclass(frozen=True)
class Concat:
    """Spec parameter `target` = torch.cat([checkpoint[s] for s in sources], dim)."""

    target: str
    sources: tuple[str, ...]
    dim: int = 0

    def match(self, name: str) -> tuple[str, ...] | None:
        """The checkpoint names for spec parameter `name`, or None if this rule is not for it.
        Each `*` of a source takes the layer index matched by the same `*` of the target."""
        pattern = "^" + re.escape(self.target).replace(r"\*", r"(\d+)") + "$"
        found = re.match(pattern, name)
        if not found:
            return None
        return tuple(_fill(source, found.groups()) for source in self.sources)


def _fill(pattern: str, indices: tuple[str, ...]) -> str:
    parts = pattern.split("*")
    return parts[0] + "".join(i + p for i, p in zip(indices, parts[1:]))


def checkpoint_sources(name: str, rules: tuple[Concat, ...]) -> tuple[tuple[str, ...], int]:
    """The checkpoint tensors that make spec parameter `name`, and the dim they concatenate on."""
    for rule in rules:
        sources = rule.match(name)
        if sources is not None:
            return sources, rule.dim
    return (name,), 0


def load_weights(
    spec: nn.Module,
    rules: tuple[Concat, ...],
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The spec's parameters (by their canonical names) built from checkpoint `tensors`, cast
    to `dtype`. Raises KilnError naming any missing tensor or mismatched shape."""
    weights = {}
    params = list(spec.named_parameters())
    for name, param in tqdm(params, desc="mapping weights", unit="tensor", disable=not progress):
        sources, dim = checkpoint_sources(name, rules)
        parts = []
        for source in sources:
            if source not in tensors:
                raise KilnError(f"the checkpoint has no tensor {source!r} (needed for {name!r}); "
                                "check that config.json matches the weight files")
            parts.append(tensors[source])
        weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        if tuple(weight.shape) != tuple(param.shape):
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
