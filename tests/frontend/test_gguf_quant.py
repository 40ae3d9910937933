"""GGUF tensors kept quantized: every kept type's blocks repacked into kiln's layout dequantize to
exactly what gguf-py dequantizes (blocks from gguf-py's own quantizer where it has one, random bytes
with finite fp16 scale fields for every type); a GGUF checkpoint offers its kept 2-D tensors
quantized, with llama's q/k rows un-permuted as the fp32 tensors are (a tiny written file and the
shipped SmolLM2's Q4_1 ones), and no others."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from kiln.errors import KilnError
from kiln.frontend.checkpoint import load_checkpoint
from kiln.frontend.checkpoint_gguf import GGUFTensor
from kiln.frontend.gguf_quant import KEPT_TYPES, repack

# Byte offsets of each kept type's fp16 fields (d, and dmin or m) within its block.
FP16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
               Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def gguf_quantizes(tensor_type: Q) -> bool:
    """Whether gguf-py can make blocks of `tensor_type` (it cannot quantize the K-quants, which the
    random-bytes test covers instead)."""
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), tensor_type)
    except NotImplementedError:
        return False
    return True


def gguf_dequantized(data: np.ndarray, tensor_type: Q, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, tensor_type).reshape(shape).copy())


def assert_repacks_exactly(data: np.ndarray, tensor_type: Q, shape: tuple[int, int]) -> None:
    """repack == gguf-py's dequantization: equal, and bit for bit but for the sign of a Q4_0 zero."""
    weight = repack(GGUFTensor("w", shape, tensor_type, data))
    assert weight.format == KEPT_TYPES[tensor_type] and weight.shape == shape
    got, expected = weight.dequantize(), gguf_dequantized(data, tensor_type, shape)
    assert torch.equal(got, expected)
    differing_bits = got.view(torch.int32) != expected.view(torch.int32)
    if tensor_type == Q.Q4_0:  # d * (q - 8) is -0.0 where d < 0 and q = 8, s * q + z is +0.0
        assert (expected[differing_bits] == 0).all()
    else:
        assert not differing_bits.any()


def random_blocks(tensor_type: Q, rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, bytes per row]: random bytes whose fp16 fields are finite values of every sign
    and magnitude, subnormals and zeros among them."""
    type_size = GGML_QUANT_SIZES[tensor_type][1]
    blocks = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for at in FP16_FIELDS[tensor_type]:
        values = rng.standard_normal(len(blocks)) * 10.0 ** rng.integers(-8, 3, len(blocks))
        values[::7] = 0
        blocks[:, at:at + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("tensor_type", list(KEPT_TYPES), ids=lambda t: t.name)
def test_random_blocks_repack_exactly(tensor_type):
    rng = np.random.default_rng(int(tensor_type))
    block_size = GGML_QUANT_SIZES[tensor_type][0]
    assert_repacks_exactly(random_blocks(tensor_type, 24, 3, rng), tensor_type, (24, 3 * block_size))


@pytest.mark.parametrize("tensor_type", [t for t in KEPT_TYPES if gguf_quantizes(t)], ids=lambda t: t.name)
def test_quantized_weights_repack_exactly(tensor_type):
    """Weights as gguf-py quantizes them (Q4_0, Q4_1, Q8_0 in gguf 0.19): a normal spread,
    outliers, a row of zeros."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 512)) * 0.05).astype(np.float32)
    w[3, ::37] = 4.0
    w[5] = 0
    assert_repacks_exactly(gguf.quants.quantize(w, tensor_type), tensor_type, w.shape)


def test_q4_0_scale_beyond_fp16_offset_is_refused():
    data = np.zeros((1, 18), dtype=np.uint8)
    data[0, :2] = np.array([8192], dtype=np.float16).view(np.uint8)
    with pytest.raises(KilnError, match="-8d"):
        repack(GGUFTensor("w", (1, 32), Q.Q4_0, data))


# What the tiny file stores per llama.cpp tensor: q and k in both 4-bit types (their rows permuted),
# v in a type kiln reads dense (bf16); the other 2-D tensors stay Q8_0.
STORED_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.BF16}


def test_checkpoint_offers_kept_tensors_quantized_in_hf_row_order(tmp_path, tiny, gguf_writer, monkeypatch):
    add_tensor = gguf.GGUFWriter.add_tensor

    def requantizing_add_tensor(writer, name, tensor, raw_dtype=None, **kwargs):
        if (tensor_type := STORED_TYPES.get(name.split(".")[-2])) is not None:
            w = gguf.quants.dequantize(tensor, raw_dtype)
            tensor, raw_dtype = gguf.quants.quantize(w, tensor_type), tensor_type
        add_tensor(writer, name, tensor, raw_dtype=raw_dtype, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", requantizing_add_tensor)
    checkpoint = load_checkpoint(str(gguf_writer(tmp_path / "m.gguf", tiny("llama"))), progress=False)
    two_d = {name for name in checkpoint.tensors if checkpoint.tensors[name].dim() == 2}
    v_proj = {name for name in two_d if "v_proj" in name}
    assert set(checkpoint.quantized) == set(checkpoint.quant_formats) == two_d - v_proj
    for name, load in checkpoint.quantized.items():
        weight = load()
        assert weight.format == checkpoint.quant_formats[name]
        assert torch.equal(weight.dequantize(), checkpoint.tensors[name]), name
    assert checkpoint.quant_formats["model.layers.1.self_attn.q_proj.weight"] == KEPT_TYPES[Q.Q4_0]
    assert checkpoint.quant_formats["model.layers.1.self_attn.k_proj.weight"] == KEPT_TYPES[Q.Q4_1]
    assert checkpoint.quant_formats["model.layers.1.mlp.up_proj.weight"] == KEPT_TYPES[Q.Q8_0]


def test_smollm2_q4_1_query_and_key_rows_unpermuted():
    checkpoint = load_checkpoint("smollm2-135m", progress=False)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        weight = checkpoint.quantized[name]()
        assert weight.format == KEPT_TYPES[Q.Q4_1] == checkpoint.quant_formats[name]
        assert torch.equal(weight.dequantize(), checkpoint.tensors[name]), name
    assert checkpoint.quant_formats["model.embed_tokens.weight"] == KEPT_TYPES[Q.Q8_0]
    assert "model.norm.weight" not in checkpoint.quantized
