"""Routers written as plain spec code (models/moe.py) trace into IR ops and route as transformers'
router modules do: the same experts and weights through the reference interpreter and the
compiled cpu program, then the `Experts` block run on them equals the per-expert reference."""

import pytest
import torch
import transformers
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from kiln.codegen.cpu import lay_out_weights, render_cpu_program
from kiln.codegen.render import load_kernel_module
from kiln.errors import KilnError
from kiln.frontend import Embedding, Experts, LastTokens, Linear, trace
from kiln.frontend.weights import random_weights
from kiln.ir import interpret, reference
from kiln.models.moe import check_groups, check_top_k, group_limited_top_k, softmax_top_k, top_k_softmax
from kiln.passes import PipelineOptions, materialize_weights, run_pipeline

D, E, K, INTER = 16, 8, 3, 12


class _RouterSpec(nn.Module):
    """embedding -> router -> experts -> last tokens -> linear: a whole step whose logits depend on
    which experts each token picked and with what weight."""

    def __init__(self, route, bias=False):
        super().__init__()
        self.embed, self.gate, self.last, self.head = Embedding(40, D), Linear(D, E, bias=bias), LastTokens(), Linear(D, 20)
        self.experts = Experts(E, D, INTER)
        self.correction = nn.Parameter(torch.empty(E, device="meta"), requires_grad=False)
        self.route = route

    def forward(self, input_ids, positions):
        h = self.embed(input_ids)
        weights, ids = self.route(self, h)
        return self.head(self.last(self.experts(h, weights, ids)))


ROUTES = {  # kiln's router code, and the transformers router module it must equal
    "softmax_top_k": (lambda m, h: softmax_top_k(m.gate(h), K, renormalize=True),
                      lambda: Qwen3MoeTopKRouter(transformers.Qwen3MoeConfig(
                          hidden_size=D, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True))),
    "top_k_softmax": (lambda m, h: top_k_softmax(m.gate(h), K),
                      lambda: GptOssTopKRouter(transformers.GptOssConfig(
                          hidden_size=D, num_local_experts=E, num_experts_per_tok=K))),
    "group_limited_top_k": (lambda m, h: group_limited_top_k(m.gate(h), m.correction, K, 4, 2, True, 2.5),
                            lambda: DeepseekV3TopkRouter(transformers.DeepseekV3Config(
                                hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2,
                                norm_topk_prob=True, routed_scaling_factor=2.5))),
}


def _hf_router(name, weights):
    router = ROUTES[name][1]()
    with torch.no_grad():
        router.weight.copy_(weights["gate.weight"])
        if name == "top_k_softmax":
            router.bias.copy_(weights["gate.bias"])
        if name == "group_limited_top_k":
            router.e_score_correction_bias.copy_(weights["correction"])
    return router


@pytest.mark.parametrize("name", list(ROUTES))
def test_routers_pick_the_experts_and_weights_transformers_picks(name):
    spec = _RouterSpec(ROUTES[name][0], bias=name == "top_k_softmax")
    weights = random_weights(spec, seed=3)
    weights["gate.weight"] *= 4  # confident routers: scores far apart relative to rounding
    tokens = 16
    inputs = {"input_ids": torch.arange(tokens, dtype=torch.int32) * 7 % 40,
              "positions": torch.arange(tokens, dtype=torch.int32),
              "logits_indices": torch.arange(tokens, dtype=torch.int32)}
    h = weights["embed.weight"][inputs["input_ids"].long()]
    with torch.no_grad():
        _, hf_weights, hf_ids = _hf_router(name, weights)(h)
    hf_out = reference.moe(h, hf_weights, hf_ids, weights["experts.gate_up_proj"], weights["experts.down_proj"])
    want = torch.nn.functional.linear(hf_out, weights["head.weight"])
    assert len(set(hf_ids.flatten().tolist())) >= 6  # tokens route to different experts
    graph = trace(spec)
    assert {"topk", "moe"} <= {n.op for n in graph.nodes}
    torch.testing.assert_close(interpret(graph, inputs, weights, {})["logits"], want, rtol=1e-5, atol=1e-5)
    phases, _ = run_pipeline(graph, PipelineOptions(verify=True))
    program = load_kernel_module(render_cpu_program(phases["mixed"]), f"test_moe_routing_{name}")
    packed = lay_out_weights(phases.values(), materialize_weights(phases["mixed"], weights))
    torch.testing.assert_close(program.step(inputs, packed, {})["logits"], want, rtol=1e-5, atol=1e-5)


def test_impossible_routing_is_refused_when_the_spec_is_built():
    with pytest.raises(KilnError, match="routes each token to 9 experts .* has 8"):
        check_top_k(9, 8)
    with pytest.raises(KilnError, match="groups must split the experts evenly"):
        check_groups(8, 3, 1)
    with pytest.raises(KilnError, match="num_experts_per_tok"):
        transformers_config = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2).to_dict()
        from kiln.models import build_spec
        build_spec({**transformers_config, "num_experts_per_tok": 5, "architectures": ["Qwen3MoeForCausalLM"]})


def test_a_router_kiln_cannot_lower_names_the_call_and_the_spec_line():
    def one_hot_route(m, h):
        weights, ids = softmax_top_k(m.gate(h), K, renormalize=False)
        return weights, torch.nn.functional.one_hot(ids, E).argmax(-1)

    with pytest.raises(KilnError, match=r"calls F.one_hot at .*test_moe_routing.py:\d+"):
        trace(_RouterSpec(one_hot_route))


def test_experts_given_the_wrong_operands_name_the_op_and_the_spec_line():
    def swapped(m, h):
        weights, ids = softmax_top_k(m.gate(h), K, renormalize=False)
        return ids, weights

    with pytest.raises(KilnError, match=r"ill-typed at .*test_moe_routing.py:\d+ .*call_module\[target=experts\].*"
                                        r"moe routing: ids f32"):
        trace(_RouterSpec(swapped))
