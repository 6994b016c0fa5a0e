"""The ``mineru-vram`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mineru-vram",
        description="GPU memory as a managed resource for MinerU.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="offline demo: random models, a generated PDF, the release receipt")
    demo.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: first GPU, else cpu)")
    demo.add_argument("--models-dir", default=None, help="where to write/reuse the random model tree")
    demo.add_argument("-o", "--out", default=None, help="also save the result to this folder")
    demo.add_argument("--isolation", choices=("none", "process"), default="none")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(device=args.device, models_dir=args.models_dir, out=args.out, isolation=args.isolation)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
