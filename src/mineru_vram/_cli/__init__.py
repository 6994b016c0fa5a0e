"""The ``mineru-vram`` command line (also ``python -m mineru_vram``): every ``argparse`` of the library.

One module per command: ``parse`` (documents to Markdown, JSON and images, with the
release receipt), ``probe`` (GPUs, who holds their memory, the CUDA-context floor,
MinerU and its models), ``models`` (MinerU's models on disk; download them ahead),
``demo`` (offline, random-weight models), ``timeline`` (memory over time while a
command runs: PNG + CSV) and ``worker`` (a task queue's worker). ``main`` builds the
parser and dispatches; ``common`` holds exit statuses, logging and quieting MinerU.

Importing this package imports nothing heavy: each command imports what it needs.
"""

from .common import EXIT_FAILED, EXIT_LEAK, EXIT_OK, EXIT_USAGE
from .main import build_parser, main
from .probe import probe_report
from .worker import run_worker_cli

__all__ = [
    "EXIT_FAILED",
    "EXIT_LEAK",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "probe_report",
    "run_worker_cli",
]
