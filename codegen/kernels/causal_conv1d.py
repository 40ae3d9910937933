"""Kernel kind `causal_conv1d`: the `causal_conv1d` op (ir/linear_rules.py) over a varlen batch.

A depthwise causal convolution of width K (typically 4) over each sequence's chunk, continuing
from the sequence's last K - 1 inputs in slot state_indices[b] of conv_state (zeros when the
chunk starts the sequence), which then holds the chunk's last K - 1 inputs (older state rows
among them when the chunk is shorter than K - 1). One program per (sequence, BLOCK_C channels)
runs the sequence's whole chunk, BLOCK_T rows at a time, and alone reads and rewrites those
channels of the slot: no other program can overwrite state it still has to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from kiln.codegen.kernels import TORCH_DTYPES, check_layout, compiled_grid, load_source, next_power_of_2, pointer, render_kernel
from kiln.codegen.targets import Target
from kiln.ir.linear_rules import ACTIVATIONS

KIND = "causal_conv1d"
BLOCK_T = 16  # rows per step of a program's loop
BLOCK_C = 128  # channels per program


@dataclass(frozen=True)
class Variant:
    """dtype: of x, weight, conv_state, bias and out; width: K; activation: None or "silu"."""

    dtype: str
    channels: int
    width: int
    bias: bool
    activation: str | None
    block_t: int
    block_c: int
    num_warps: int
    num_stages: int = 1

    def __post_init__(self):
        if self.width < 2 or self.activation not in ACTIVATIONS:
            raise ValueError(f"width must be >= 2 and activation one of {list(ACTIVATIONS)}: {self}")

    @property
    def cache_key(self) -> str:
        extras = ("__bias" if self.bias else "") + (f"__{self.activation}" if self.activation else "")
        return (f"{KIND}__{self.dtype}__c{self.channels}_k{self.width}{extras}__bt{self.block_t}_bc{self.block_c}"
                f"__w{self.num_warps}")


def choose(target: Target, *, dtype: str, channels: int, width: int, bias: bool, activation: str | None) -> Variant:
    """The same on every target: [BLOCK_T, BLOCK_C] tiles of 16 x 128 over 4 warps (narrower for
    fewer channels), a memory-bound loop."""
    return Variant(dtype, channels, width, bias, activation, BLOCK_T, min(BLOCK_C, next_power_of_2(channels)), num_warps=4)


def render(variant: Variant) -> str:
    return render_kernel(KIND, variant, bias=variant.bias, activation=variant.activation)


def load(variant: Variant):
    return load_source(render(variant), variant)


def signature(variant: Variant) -> dict[str, str]:
    act, index = pointer(variant.dtype), pointer("i32")
    bias = {"p_bias": act} if variant.bias else {}
    return {"p_x": act, "p_weight": act, "p_conv_state": act, "p_query_start": index, "p_seq_lens": index,
            "p_state_indices": index, **bias, "p_out": act}


def constexprs(variant: Variant) -> dict[str, object]:
    return {"CHANNELS": variant.channels, "WIDTH": variant.width, "BLOCK_T": variant.block_t,
            "BLOCK_C": variant.block_c, "BLOCK_S": next_power_of_2(variant.width - 1)}


def grid_source(variant: Variant) -> str:
    """One program per (sequence, BLOCK_C channels)."""
    return f"lambda seqs: (seqs, {triton.cdiv(variant.channels, variant.block_c)})"


def grid(variant: Variant, num_seqs: int) -> tuple[int, int]:
    return compiled_grid(grid_source(variant))(num_seqs)


def launch(variant: Variant, x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor,
           query_start: torch.Tensor, seq_lens: torch.Tensor, state_indices: torch.Tensor,
           bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The op's tensors, contiguous, in the variant's dtype: x [T, C]; weight [C, K]; conv_state
    [NS, K - 1, C] (updated in place at the sequences' slots); query_start [B + 1], seq_lens and
    state_indices [B] int32; bias [C] for a variant with bias. Returns out [T, C] (allocated when None)."""
    channels, width, num_seqs, dtype = variant.channels, variant.width, seq_lens.shape[0], TORCH_DTYPES[variant.dtype]
    if (bias is not None) != variant.bias:
        raise ValueError(f"this variant {'needs' if variant.bias else 'takes no'} bias")
    out = torch.empty_like(x) if out is None else out
    for name, tensor in (("x", x), ("out", out)):
        check_layout(name, tensor, (x.shape[0], channels), (channels, 1), dtype)
    check_layout("weight", weight, (channels, width), (width, 1), dtype)
    check_layout("conv_state", conv_state, (conv_state.shape[0], width - 1, channels), ((width - 1) * channels, channels, 1),
                 dtype)
    if bias is not None:
        check_layout("bias", bias, (channels,), (1,), dtype)
    check_layout("query_start", query_start, (num_seqs + 1,), (1,), torch.int32)
    for name, tensor in (("seq_lens", seq_lens), ("state_indices", state_indices)):
        check_layout(name, tensor, (num_seqs,), (1,), torch.int32)
    if num_seqs:
        load(variant).kernel[grid(variant, num_seqs)](
            x, weight, conv_state, query_start, seq_lens, state_indices, *(() if bias is None else (bias,)), out,
            **constexprs(variant), num_warps=variant.num_warps, num_stages=variant.num_stages,
        )
    return out
