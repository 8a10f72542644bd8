"""The `dmi` command: run, inspect, demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys

ENGINES = ("hf",)

# What `dmi` exits with when whoever reads its output (head, less) stops reading: a program
# killed by SIGPIPE, which is what Python's default of ignoring the signal replaces, exits so.
EXIT_BROKEN_PIPE = 128 + 13


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dmi", description="Deep model inspection: capture an LLM's internals "
                                        "while it generates, to HDF5.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate from prompts with capture on, then print the summary")
    run.add_argument("--engine", choices=ENGINES, default="hf")
    run.add_argument("--model", required=True, help="local model folder (HF format)")
    run.add_argument("--spec", help="capture spec file (.json or .yaml); default: residual stream + logits")
    run.add_argument("--prompts", required=True,
                     help="text file, one prompt a line; or .jsonl with {'prompt': str} or {'input_ids': [int]}")
    run.add_argument("--max-new-tokens", type=_positive_int, default=16)
    run.add_argument("--batch-size", type=_positive_int, default=8)
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

    __import__("dmi.cli.hooks_cmd", fromlist=["add_parser"]).add_parser(sub)
    from .export_cmd import add_parser as add_export

    add_export(sub)

    sub.add_parser("plugins", help="list registered adapters, sinks, tables and predicates, and their packages")

    demo = sub.add_parser("demo", help="build a tiny random Qwen3 and a byte tokenizer locally, capture, summarise")
    demo.add_argument("--cache", help="where the demo model lives (default ~/.cache/dmi or $DMI_CACHE)")
    demo.add_argument("--out", default="dmi_demo.h5")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=24)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to matrix_bench, --help included
        from matrix_bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from dmi.errors import DmiError

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
        elif hasattr(args, "handler"):
            args.handler(args)
        elif args.command == "demo":
            from .demo_cmd import demo

            demo(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
    except BrokenPipeError:
        # The reader went away (`dmi inspect f.h5 | head`): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not report the same pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"dmi {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, DmiError) as e:
        print(f"dmi {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """The error's message on one line (KeyError's without the quotes str() adds)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__
