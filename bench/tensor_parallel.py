"""Tensor-parallel throughput: a Llama-3-8B-shaped model with random weights, served at tp 1 and
at tp 2 (two processes, one GPU each; with CUDA graphs and with --enforce-eager) side by side in
one run: offline throughput of a batch of random prompts (ignore_eos) and batch-1 decode tokens/s.
Meant for a machine with 2+ GPUs (none has been lent yet); `--tiny --target cpu` runs the same
path on a CPU with a small model of the same kind, where the figures only show that it works
(gloo all-reduces are not NVLink).

    python bench/tensor_parallel.py [--target h100] [--layers 32] [--tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
import transformers
from machine import cpu_description, write_results

from kiln.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = {**LLAMA_8B, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def checkpoint(shape: dict, layers: int, out: Path) -> Path:
    """A random checkpoint of `shape` (Llama 3 config fields) with `layers` layers and a
    word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, num_hidden_layers=layers, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(out)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(shape["vocab_size"])}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def measure(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm up
    start = time.perf_counter()
    llm.generate(prompts, params)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(prompts[:1], params)
    single_s = time.perf_counter() - start
    return {"offline_tok_s": round(len(prompts) * new_tokens / batch_s, 1),
            "batch1_tok_s": round(new_tokens / single_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None, help="kiln target (default: this machine's)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a small model of the same kind (a CPU check)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "tensor_parallel.json")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    device = f"{gpus} x {torch.cuda.get_device_name()}" if gpus else cpu_description()
    generator = torch.Generator().manual_seed(0)
    shape = TINY if args.tiny else LLAMA_8B
    prompts = [torch.randint(1, shape["vocab_size"], (256,), generator=generator).tolist()
               for _ in range(args.prompts)]
    results: dict = {"device": device, "model": "tiny" if args.tiny else "llama-3-8b-shaped", "layers": args.layers,
                     "prompts": args.prompts, "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(checkpoint(shape, args.layers, Path(tmp)))
        for name, tp, eager in (("tp1", 1, False), ("tp2", 2, False), ("tp2_eager", 2, True)):
            print(f"{name}: compiling and loading", flush=True)
            llm = LLM(path, target=args.target, tp=tp, max_model_len=1024, kv_cache_memory=4 << 30, progress=False,
                      enforce_eager=eager)
            results[name] = measure(llm, prompts, args.new_tokens)
            llm.close()
            del llm  # its KV cache, before the next run sizes its own
            gc.collect()
            if gpus:
                torch.cuda.empty_cache()
            print(f"{name}: {results[name]}", flush=True)
    results["tp2_over_tp1_offline"] = round(results["tp2"]["offline_tok_s"] / results["tp1"]["offline_tok_s"], 3)
    # on GPUs each rank's step graphs capture its NCCL collectives; on the CPU both run eagerly
    results["tp2_graphs_over_eager_batch1"] = round(results["tp2"]["batch1_tok_s"] / results["tp2_eager"]["batch1_tok_s"], 3)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
