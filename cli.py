"""The `kiln` command line. User errors print one line (`error: ...`) and exit 1, no traceback."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from kiln.errors import KilnError


def _inspect(args) -> None:
    from kiln.frontend.checkpoint import load_checkpoint
    from kiln.frontend.trace import StepConfig, trace
    from kiln.ir import op_counts, print_graph
    from kiln.models import build_spec

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
    print(f"step graph    {len(graph.nodes)} nodes, inputs: {', '.join(n.name for n in graph.inputs)}")
    print(f"ops           {ops}")
    print("(--ir prints the whole traced graph)")


def _describe(spec) -> str:
    cfg = getattr(spec, "config", None)
    if cfg is None:
        return type(spec).__name__
    tied = ", tied embeddings" if cfg.tie_word_embeddings else ""
    return (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads ({cfg.num_kv_heads} kv, "
            f"head_dim {cfg.head_dim}), FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}, {cfg.rope}{tied}")


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
