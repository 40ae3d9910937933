"""What mixture-of-experts specs share: the routers (plain spec code: softmax, top-k, sums), a
sparse MoE block (a router `gate`, the `experts`, an optional shared expert), and the loader
rules that stack an HF checkpoint's per-expert projections into the `Experts` block's tensors.

Routers, as transformers computes them. Ties: they select with torch.topk, as transformers does,
so equal scores resolve the same way on both sides (torch.topk's order among equal values, which
is not by index) as long as the scores are bit-equal; kiln's router GEMM may round differently in
the last bit, which only decides between scores within fp32 rounding of each other.
  softmax_top_k   softmax in fp32 over all experts, the top_k probabilities, optionally
                  renormalized to sum to 1 (Mixtral always; Qwen3-MoE `norm_topk_prob`)
  top_k_softmax   the top_k logits, then a softmax over those k (GPT-OSS)
  group_limited_top_k  sigmoid scores plus a learned correction bias choose the experts within
                  the best groups (each group scored by its two best experts); the chosen experts'
                  plain sigmoid scores, optionally renormalized, times a scaling factor, weigh
                  them (DeepSeek-V3). The groups kept are those scoring at least the
                  `top_groups`-th best group score: transformers scatters exactly `top_groups` of
                  them, so the two differ only when group scores tie exactly at that rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.frontend.blocks import Experts, Linear
from kiln.frontend.weights import Concat, Stack


def num_experts(config) -> int:
    """The config's expert count: `num_experts` (Qwen's hub configs) or `num_local_experts` (Mixtral,
    GPT-OSS, and what transformers 5 writes for every family)."""
    return config["num_experts"] if "num_experts" in config else config["num_local_experts"]


def check_top_k(top_k: int, num_experts: int) -> None:
    """Refuses a router that picks more experts than there are (when the spec is built)."""
    if not 1 <= top_k <= num_experts:
        raise KilnError(f"the config routes each token to {top_k} experts (num_experts_per_tok) but the model has "
                        f"{num_experts}: top_k must be between 1 and the number of experts")


def softmax_top_k(logits, top_k: int, renormalize: bool):
    """(weights [T, top_k] fp32, ids [T, top_k]) from router logits [T, E]."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def top_k_softmax(logits, top_k: int):
    """(weights [T, top_k], ids [T, top_k]): a softmax over the top_k logits."""
    values, ids = torch.topk(logits, top_k, dim=-1)
    return F.softmax(values, dim=-1), ids


def group_limited_top_k(logits, correction_bias, top_k: int, groups: int, top_groups: int, renormalize: bool,
                        scaling: float):
    """(weights [T, top_k] fp32, ids [T, top_k]) from router logits [T, E] and the correction bias [E]
    (see the module docstring). The caller checks the group counts (check_groups)."""
    scores = torch.sigmoid(logits.float())
    choice = (scores + correction_bias.float()).unflatten(-1, (groups, -1))  # [T, G, E / G]
    group_scores = torch.topk(choice, 2, dim=-1).values.sum(dim=-1)  # [T, G]
    threshold = torch.topk(group_scores, top_groups, dim=-1).values[:, top_groups - 1:]  # [T, 1]
    kept = torch.where((group_scores >= threshold)[:, :, None], choice, float("-inf")).flatten(1)
    ids = torch.topk(kept, top_k, dim=-1).indices
    weights = torch.gather(scores, 1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def check_groups(num_experts: int, groups: int, top_groups: int) -> None:
    """Refuses expert groups group_limited_top_k cannot route over (when the spec is built)."""
    if num_experts % groups or not 1 <= top_groups <= groups or num_experts // groups < 2:
        raise KilnError(f"{num_experts} experts in {groups} groups (n_group), keeping {top_groups} (topk_group): the "
                        "groups must split the experts evenly, at least 2 per group, and 1 <= topk_group <= n_group")


class SharedExpert(nn.Module):
    """A dense silu-gated MLP that every token goes through (HF's `shared_expert`; the loader packs
    its gate_proj/up_proj into gate_up_proj, see SHARED_EXPERT)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """HF's sparse MoE block: router `gate` (a Linear to the experts' logits), softmax_top_k routing,
    `experts` (silu-gated), and, when `shared_intermediate` is given, a `shared_expert` whose output
    is scaled by sigmoid(`shared_expert_gate`(x)) (Qwen2-MoE / Qwen3-Next)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, renormalize: bool,
                 shared_intermediate: int | None = None):
        super().__init__()
        check_top_k(top_k, num_experts)
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, intermediate)
        if shared_intermediate is not None:
            self.shared_expert = SharedExpert(hidden, shared_intermediate)
            self.shared_expert_gate = Linear(hidden, 1)

    def forward(self, x):
        weights, ids = softmax_top_k(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def stacked_expert_rules(prefix: str, gate: str, up: str, down: str) -> tuple[Stack, ...]:
    """Rules stacking per-expert Linears `<prefix>.experts.<e>.<gate|up|down>.weight` of an HF
    checkpoint into `<prefix>.experts.gate_up_proj` [E, 2I, H] and `.down_proj` [E, H, I]
    (`prefix` with `*` for the layer)."""
    experts = f"{prefix}.experts"
    return (
        Stack(f"{experts}.gate_up_proj", (f"{experts}.#.{gate}.weight", f"{experts}.#.{up}.weight")),
        Stack(f"{experts}.down_proj", (f"{experts}.#.{down}.weight",)),
    )


def shared_expert_rule(prefix: str) -> Concat:
    """The rule packing `<prefix>.shared_expert.gate_proj/up_proj` into its gate_up_proj."""
    expert = f"{prefix}.shared_expert"
    return Concat(f"{expert}.gate_up_proj.weight", (f"{expert}.gate_proj.weight", f"{expert}.up_proj.weight"))
