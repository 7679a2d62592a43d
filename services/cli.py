"""The `megascale` command: one entry point, one sub-command per concern.

Each sub-command lives in the module that owns it and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (a callable taking the parsed namespace and returning an exit
code). Modules are imported lazily so that ``megascale plan`` never imports torch, and a broken
optional role never stops the others from starting.

Errors meant for the user are raised as :class:`services.errors.UserError`; they print as one
line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from services.errors import UserError

# name -> (module that defines register(subparsers), one-line help). Order of `--help`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "credential": ("services.launch.credential", "print one role's credential file"),
    "demo-model": ("services.core.demo", "write a small random MoE checkpoint + tokenizer"),
    "generate": ("services.core.generate", "offline generation (the monolithic reference)"),
    "plan": ("services.planner.cli", "search a deployment plan (or --profile)"),
    "serve": ("services.launch.serve", "run one role: attention | expert | scheduler | gateway"),
    "up": ("services.launch.up", "start the whole mesh locally"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megascale", description="Disaggregated expert-parallel MoE serving."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        # Import only the requested sub-command's module; list the rest by name only.
        if wanted == name:
            importlib.import_module(module).register(subparsers)
        elif wanted not in SUBCOMMANDS:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before torch (and its OpenMP runtime) loads: OpenMP workers that spin after each parallel
    # region keep the cores from the expert kernel's own threads (services/core/cpu_gemm.py)
    # and from the role's other threads; a colocated replica's decode step with 2 threads took
    # 1.2 s spinning against 0.17 s sleeping (docs/BENCHMARKS.md §9). A user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except UserError as exc:
        print(f"megascale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
