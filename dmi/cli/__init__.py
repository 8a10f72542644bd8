"""The `dmi` command: run, inspect, demo."""
from __future__ import annotations

import argparse
import logging
import sys

ENGINES = ("hf",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmi", description="Deep model inspection: capture an LLM's internals "
                                                        "while it generates, to HDF5.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate from prompts with capture on, then print the summary")
    run.add_argument("--engine", choices=ENGINES, default="hf")
    run.add_argument("--model", required=True, help="local model folder (HF format)")
    run.add_argument("--spec", help="capture spec file (.json or .yaml); default: residual stream + logits")
    run.add_argument("--prompts", required=True,
                     help="text file, one prompt a line; or .jsonl with {'prompt': str} or {'input_ids': [int]}")
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--out", help="output file; overrides the spec's sink")
    run.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    run.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    run.add_argument("--attn", default="sdpa", help="attn_implementation (eager is needed for attn.hook_pattern)")
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quiet", action="store_true", help="no progress line, no summary")

    ins = sub.add_parser("inspect", help="summarise a capture file")
    ins.add_argument("path")

    bench = sub.add_parser("bench", help="the overhead benchmark matrix (same as python -m matrix_bench)",
                           add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    from .export_cmd import add_parser as add_export

    add_export(sub)

    sub.add_parser("plugins", help="list registered adapters, sinks, tables and predicates, and their packages")

    demo = sub.add_parser("demo", help="build a tiny random Qwen3 and a byte tokenizer locally, capture, summarise")
    demo.add_argument("--cache", help="where the demo model lives (default ~/.cache/dmi or $DMI_CACHE)")
    demo.add_argument("--out", default="dmi_demo.h5")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to matrix_bench, --help included
        from matrix_bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "inspect":
            from .inspect_cmd import inspect_file

            print(inspect_file(args.path))
        elif args.command == "run":
            from .run_cmd import run

            run(args)
        elif args.command == "export":
            from .export_cmd import export

            print(export(args))
        elif args.command == "plugins":
            from .plugins_cmd import list_plugins

            print(list_plugins())
        elif args.command == "demo":
            from .demo_cmd import demo

            demo(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"dmi {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
