"""The parser and the entry point of ``mineru-vram``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .common import BACKENDS, EXIT_INTERRUPTED, EXIT_USAGE, Formatter, err, setup_logging
from .models import cmd_demo, cmd_models
from .parse import cmd_parse
from .probe import cmd_probe
from .timeline import cmd_timeline
from .worker import run_worker_cli

_EXAMPLES = """\
examples:
  mineru-vram parse paper.pdf scans/ -o out/                  pipeline backend, first GPU (else CPU)
  mineru-vram parse paper.pdf -o out/ --backend flash         text PDFs without models
  mineru-vram parse a.pdf b.pdf -o out/ --isolation process   models in a worker process
  mineru-vram probe                                           GPUs, processes, CUDA floor, MinerU
  mineru-vram demo                                            offline demo, CPU is fine
  mineru-vram models download                                 fetch MinerU's models ahead (then offline)
  mineru-vram timeline -o tl/ -- mineru-vram parse a.pdf -o out/
  mineru-vram worker tasks.db --until-idle                    process a task queue

exit status: 0 ok; 1 a document failed (each is named) or the session could not start;
2 bad arguments or configuration; 3 --strict and memory was not fully released.
documentation: docs/ in the mineru-vram repository (docs/cli.md for this command)
"""


def build_parser() -> argparse.ArgumentParser:
    from mineru_vram._version import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (MinerU's included)")

    parser = argparse.ArgumentParser(
        prog="mineru-vram",
        description="GPU memory as a managed resource for MinerU: parse documents and get every byte back.",
        epilog=_EXAMPLES,
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"mineru-vram {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "parse",
        parents=[common],
        formatter_class=Formatter,
        help="parse PDFs to Markdown, JSON and images; print the release receipt",
        description=(
            "Parse PDFs in one session: load MinerU's models once, parse every document, release,\n"
            "and print the receipt. Each document goes to OUT/<stem>/: <stem>.md, <stem>_content_list.json,\n"
            "<stem>_middle.json and images/. A document that fails is named and the others still run;\n"
            "the exit status is then 1."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="PDF files, or folders (their *.pdf files)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (created if missing)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pipeline",
        help="pipeline (MinerU's models), flash (no models, text PDFs), vlm or hybrid (a VLM engine); "
        "default %(default)s",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: MINERU_VRAM_DEVICE, else first GPU, else cpu)")
    p.add_argument("--isolation", choices=("none", "process"), help="process: models live in a worker process")
    p.add_argument("--pages", metavar="PAGES", help="1-based pages of each document, e.g. 1-5 or 1,3,7-9")
    p.add_argument("--ocr-mode", choices=("auto", "txt", "ocr"), default="auto", help="default %(default)s")
    p.add_argument("--models-dir", metavar="DIR", help="a MinerU model tree (default: MinerU's own configuration)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds per document (needs --isolation process)")
    p.add_argument("--strict", action="store_true", help="exit 3 when memory was not fully released")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    vlm = p.add_argument_group("VLM engine (for --backend vlm or hybrid)")
    vlm.add_argument(
        "--engine", choices=("sglang", "vllm", "transformers", "llama-cpp"), help="start this engine for the run"
    )
    vlm.add_argument("--model-path", metavar="DIR", help="the VLM model directory (--engine)")
    vlm.add_argument("--vram-budget-gib", type=float, metavar="GIB", help="the engine's GPU memory budget")
    vlm.add_argument("--server-url", metavar="URL", help="use a running OpenAI-compatible VLM server instead")
    vlm.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="a file holding the server's API key (--server-url); default: MINERU_VRAM_API_KEY",
    )
    # Deprecated: a key on the command line is readable by every local user (ps, /proc/<pid>/cmdline).
    vlm.add_argument("--api-key", help=argparse.SUPPRESS)

    p = sub.add_parser(
        "probe",
        parents=[common],
        formatter_class=Formatter,
        help="GPUs, per-process memory, torch allocator, CUDA-context floor, MinerU and its models",
        description=(
            "Report what this machine has and who holds GPU memory: each GPU by NVML (driver, used and\n"
            "free memory, every process's share), this process's torch allocator, the CUDA-context floor\n"
            "measured now in a child process, MinerU's version, configuration and model folders.\n"
            "Works without a GPU and says so."
        ),
    )
    p.add_argument("--device", default="cuda:0", help="where to measure the CUDA-context floor (default cuda:0)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the CUDA-context measurement")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=Formatter,
        help="offline demo: random models, a generated PDF, the release receipt",
        description="Write random-weight MinerU models, parse a generated 2-page PDF, print the receipt.",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: first GPU, else cpu)")
    p.add_argument("--models-dir", default=None, help="where to write/reuse the random model tree")
    p.add_argument("-o", "--out", default=None, help="also save the result to this folder")
    p.add_argument("--isolation", choices=("none", "process"), default="none")

    p = sub.add_parser(
        "timeline",
        parents=[common],
        formatter_class=Formatter,
        help="run a command and record GPU memory over time: a PNG plot and CSVs",
        description=(
            "Run COMMAND and sample memory while it runs (50 Hz by default): the whole device and the\n"
            "command's processes (its descendants too, such as isolated workers) by NVML, and their host\n"
            "RSS. mineru-vram sessions inside the command mark their phases (load, parse per document,\n"
            "release); the end of the command is marked 'exit'. Writes OUT/timeline.png,\n"
            "OUT/timeline.csv (one row per sample), OUT/phases.csv and OUT/events.jsonl.\n"
            "Without a GPU, host RSS is recorded and the plot says so. Exits with COMMAND's status."
        ),
        epilog="example:\n  mineru-vram timeline -o tl/ -- mineru-vram parse paper.pdf -o out/ --backend flash",
    )
    p.add_argument("-o", "--out", default="mineru-vram-timeline", metavar="DIR", help="default %(default)s")
    p.add_argument("--device", help="the GPU to sample (default: first GPU)")
    p.add_argument("--hz", type=float, default=50.0, help="samples per second (default %(default)s)")
    p.add_argument("--tail", type=float, default=1.0, metavar="S", help="keep sampling after the exit (default 1 s)")
    p.add_argument("--title", help="the plot's title (default: the command)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND...", help="the command to run")

    p = sub.add_parser(
        "models",
        parents=[common],
        formatter_class=Formatter,
        help="which MinerU models a backend needs, whether they are on disk; download them ahead",
        description=(
            "Show the MinerU model repositories a backend needs and whether each is complete under the\n"
            "models folder (default: MinerU's own configuration, ~/.mineru/models). With 'download', fetch\n"
            "the missing ones with MinerU's downloader (Hugging Face, else ModelScope), so later sessions\n"
            "start offline. Exit status: 0 all present (or downloaded), 1 some missing or a download failed."
        ),
        epilog=(
            "examples:\n  mineru-vram models\n"
            "  mineru-vram models download --backend pipeline --models-dir /data/mineru"
        ),
    )
    p.add_argument("action", nargs="?", choices=("status", "download"), default="status", help="default status")
    p.add_argument("--backend", choices=BACKENDS, default="pipeline", help="default %(default)s")
    p.add_argument("--models-dir", metavar="DIR", help="the model folder (default: MinerU's configuration)")
    p.add_argument("--small-backend", choices=("torch", "onnx"), default="torch", help="default %(default)s")
    p.add_argument("--source", choices=("auto", "huggingface", "modelscope"), default="auto", help="download source")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    # Help listing only: main() hands `worker ...` to the queue's own parser before argparse runs.
    sub.add_parser(
        "worker",
        help="run a task queue's worker loop (mineru-vram worker tasks.db --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "worker":
        return run_worker_cli(args_list[1:])
    parser = build_parser()
    if not args_list:
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(args_list)
    setup_logging(args.verbose)
    commands = {
        "parse": cmd_parse,
        "probe": cmd_probe,
        "timeline": cmd_timeline,
        "demo": cmd_demo,
        "models": cmd_models,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        err("mineru-vram: interrupted")
        return EXIT_INTERRUPTED
