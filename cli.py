"""The `kiln` command line. User errors print one line (`error: ...`) and exit 1, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from kiln.errors import KilnError


def _inspect(args) -> None:
    from kiln.frontend.checkpoint import load_checkpoint
    from kiln.frontend.tracer import StepConfig, trace
    from kiln.ir import op_counts, print_graph
    from kiln.ir.cache_groups import plan_cache_groups
    from kiln.models import build_spec
    from kiln.runtime.kv_groups import describe_group

    ckpt = load_checkpoint(args.model, progress=False)
    spec = build_spec(ckpt.config)
    graph = trace(spec, StepConfig(dtype=args.dtype))
    if args.ir:
        print(print_graph(graph), end="")
        return
    params = sum(p.numel() for p in spec.parameters())
    attention = Counter(str(n.attrs["spec"]) for n in graph.nodes if n.op == "attention")
    ops = ", ".join(f"{op} {count}" for op, count in op_counts(graph).items())
    print(f"model         {args.model} ({ckpt.path})")
    print(f"architecture  {ckpt.config['architectures'][0]} -> {type(spec).__module__}.{type(spec).__name__}")
    print(f"config        {_describe(spec)}")
    print(f"parameters    {params / 1e6:.1f}M ({params * 4 / 2**20:.0f} MiB in f32, {params * 2 / 2**20:.0f} MiB in bf16)")
    for kind, count in attention.items():
        print(f"attention     {count} x {kind}")
    groups = plan_cache_groups(graph, spec.config.max_position_embeddings)
    print(f"cache groups  {', '.join(describe_group(g) for g in groups)}")
    print(f"step graph    {len(graph.nodes)} nodes, inputs: {', '.join(n.name for n in graph.inputs)}")
    print(f"ops           {ops}")
    print("(--ir prints the whole traced graph)")


def _compile(args) -> None:
    from kiln.compiler import CompileOptions, compile_cached, compile_model

    options = CompileOptions(target=args.target, dtype=args.dtype, block_size=args.block_size,
                             dump_ir=Path(args.dump_ir) if args.dump_ir else None, quant=args.quant,
                             dequantize=args.dequantize, quant_activations=args.quant_activations, tp=args.tp)
    if options.dump_ir:  # the IR dumps come from a real compile
        summary = compile_model(args.model, args.output, options)
    else:
        summary = compile_cached(args.model, options, out=args.output)
    print("\n".join(summary.lines()))


def _generate(args) -> None:
    from kiln.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    llm = _llm(args)
    try:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        for out in llm.stream(prompt, params):
            print(out.outputs[0].delta_text, end="", flush=True)
        print()
    finally:
        llm.close()


def _llm(args):
    """The kiln.LLM that `generate` and `serve` run, from the options `_add_engine_options` adds.
    Under torchrun, a rank other than 0 serves rank 0's steps here and exits."""
    from kiln.llm import LLM, open_artifact, rank_setup
    from kiln.runtime.tensor_parallel import run_rank

    executor_options = dict(kv_cache_memory=args.kv_cache_memory << 20, max_num_seqs=args.max_num_seqs,
                            max_model_len=args.max_model_len, interpret=args.interpret,
                            gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                            host_cache_memory=int(args.host_cache_gb * 2**30))
    rank = int(os.environ.get("RANK", "0"))
    if args.tp > 1 and rank > 0:
        run_rank(rank, rank_setup(open_artifact(args.model, target=args.target, progress=False, tp=args.tp), args.tp,
                                  **executor_options))
        sys.exit(0)
    return LLM(args.model, target=args.target, state_snapshot_interval=args.state_snapshot_interval, tp=args.tp,
               **executor_options)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="artifact directory, built-in name, HF model directory or .gguf file")
    parser.add_argument("--target", help="compile a model for this target (default: this machine's device)")
    parser.add_argument("--kv-cache-memory", type=int, default=1024, metavar="MIB",
                        help="KV-cache budget on a CPU or when interpreting (MiB, default 1024)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory for weights, activations and KV cache (default 0.9)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences running at once, at most")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run decode steps eagerly instead of replaying CUDA graphs (GPU) or CPU step graphs")
    parser.add_argument("--interpret", action="store_true",
                        help="run a GPU artifact's Triton kernels under Triton's interpreter on the CPU (slow; checks)")
    parser.add_argument("--host-cache-gb", type=float, default=0.0, metavar="GIB",
                        help="host memory for the prefix cache's host tier: KV blocks evicted from the pool are kept "
                             "there and copied back on a later hit instead of recomputed (default 0: no tier)")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel degree: N ranks, one process (and GPU) each; ranks 1.. are spawned here, "
                             "or started by torchrun on several nodes (default 1)")
    parser.add_argument("--state-snapshot-interval", type=int, metavar="TOKENS",
                        help="prefix caching for a model with linear-attention layers: snapshot each sequence's state "
                             "every TOKENS tokens (a multiple of the block size; default: no prefix caching for them)")


def _serve(args) -> None:
    from kiln.runtime.openai_protocol import RequestLimits
    from kiln.runtime.server import serve

    limits = RequestLimits(max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth,
                           max_prompts=args.max_prompts, max_prompt_tokens=args.max_prompt_tokens)
    llm = _llm(args)
    try:
        serve(llm, host=args.host, port=args.port, api_key=args.api_key,
              model_name=args.served_model_name or args.model, limits=limits, drain_timeout=args.drain_timeout,
              tool_call_parser=args.tool_call_parser)
    finally:
        llm.close()


def _describe(spec) -> str:
    """The spec's config in one line: the usual sizes when the config has them; layers and rope
    variants read off the spec's own blocks (any architecture has those)."""
    from kiln.frontend.blocks import Attention, Rope

    cfg = getattr(spec, "config", None)
    if cfg is None:
        return type(spec).__name__
    get = lambda name: getattr(cfg, name, "?")  # noqa: E731
    layers = sum(isinstance(m, Attention) for m in spec.modules())
    ropes = "".join(f", {r}" for r in sorted({str(m.spec) for m in spec.modules() if isinstance(m, Rope)}))
    tied = ", tied embeddings" if getattr(cfg, "tie_word_embeddings", False) else ""
    return (f"{layers} layers, hidden {get('hidden_size')}, {get('num_heads')} heads "
            f"({get('num_kv_heads')} kv, head_dim {get('head_dim')}), FFN {get('intermediate_size')}, "
            f"vocab {get('vocab_size')}{ropes}{tied}")


def _target_names() -> list[str]:
    """The compile targets, one per module of kiln/codegen/targets/ (and of the directories in
    KILN_TARGETS_PATH) not named `_*`: read off the file names, so that commands other than
    `compile` load no compiler module (each module's record bears its file's name)."""
    extra = [Path(d) for d in os.environ.get("KILN_TARGETS_PATH", "").split(os.pathsep) if d]
    files = [f for d in (Path(__file__).parent / "codegen" / "targets", *extra) for f in d.glob("*.py")]
    return sorted({f.stem for f in files if not f.stem.startswith("_")})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="kiln: compile an LLM into Triton kernels for one GPU target, and serve it.",
        epilog="A <model> is a built-in name (smollm2-135m), a Hugging Face model directory, or a .gguf file.",
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    inspect = commands.add_parser("inspect", help="show a model's architecture, parameter count and traced IR")
    inspect.add_argument("model", help="built-in name, HF model directory or .gguf file")
    inspect.add_argument("--ir", action="store_true", help="print the whole traced step graph")
    inspect.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="activation/weight dtype")
    inspect.set_defaults(run=_inspect)

    compile_ = commands.add_parser("compile", help="compile a model into an artifact for one target")
    compile_.add_argument("model", help="built-in name, HF model directory or .gguf file")
    targets = _target_names()
    compile_.add_argument("--target", default="cpu", type=str.lower, choices=targets, metavar="TARGET",
                          help=f"one of {', '.join(targets)} (default: cpu)")
    compile_.add_argument("-o", "--output", required=True, help="artifact directory to write")
    compile_.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="default: f32 on cpu, bf16 on GPUs")
    compile_.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens (default 16)")
    compile_.add_argument("--dump-ir", metavar="DIR", help="write the IR after every compiler step into DIR")
    compile_.add_argument("--tp", type=int, default=1, metavar="N",
                          help="tensor-parallel degree: shards the model into N ranks (the same programs, "
                               "weights.rank<r>.safetensors per rank; --dump-ir writes rank 0's IR)")
    compile_.add_argument("--quant", choices=["int8", "int4", "fp8"],
                          help="quantize the floating-point linear weights (int4: groups of 128; int8, fp8: per channel)")
    compile_.add_argument("--dequantize", action="store_true",
                          help="store every weight dense (a GGUF file's quantized tensors are kept quantized by default)")
    compile_.add_argument("--quant-activations", choices=["int16", "int8", "fp32"], default="int16",
                          help="cpu target, quantized weights, batch-1 decode: multiply them by activations "
                               "quantized per block of 32 to int16 (the default; relative error ~2e-5) or int8 "
                               "(llama.cpp's scheme; ~6e-3), with integer dot products, or by fp32 activations "
                               "(exact dequantize-then-matmul, as prefill and larger batches always are)")
    compile_.set_defaults(run=_compile)

    generate = commands.add_parser("generate", help="generate text from an artifact or a model (compiled first)")
    _add_engine_options(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0, help="0 = off")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--ignore-eos", action="store_true")
    generate.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible API")
    _add_engine_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health")
    serve.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: <model>)")
    serve.add_argument("--tool-call-parser", choices=("hermes", "llama3_json", "mistral"),
                       help="the format of the model's tool calls for tool_choice auto (default: the one its chat "
                            "template shows)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="BYTES",
                       help="largest request body; a larger one gets 413 (default 1048576, 1 MiB)")
    serve.add_argument("--max-json-depth", type=int, default=64, metavar="N",
                       help="deepest nesting of arrays and objects in a request body; deeper gets 400 (default 64)")
    serve.add_argument("--max-prompts", type=int, default=64, metavar="N",
                       help="prompts in one /v1/completions request (a `prompt` list), at most (default 64)")
    serve.add_argument("--max-prompt-tokens", type=int, default=131072, metavar="N",
                       help="prompt tokens of one request, all its prompts together, at most (default 131072)")
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM or Ctrl-C: new requests get 503 and those in progress may finish for this "
                            "long; then each gets an error and the server exits (default 30; a second signal "
                            "stops waiting)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args.run(args)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
