"""What every command shares: exit statuses, the help formatter, logging and quieting MinerU."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # a document failed (each is named), or the session could not open
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_LEAK = 3  # --strict, and the release receipt is not clean
EXIT_INTERRUPTED = 130

BACKENDS = ("pipeline", "flash", "vlm", "hybrid")
PROGRESS_DESC = "mineru-vram"  # our own progress bar; every other tqdm bar is silenced unless -v


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        # pypdfium2 warns "Explicitly closing <PdfBitmap ...>" for every page MinerU renders:
        # noise for someone reading a progress bar. -v shows it again.
        logging.getLogger("pypdfium2").setLevel(logging.ERROR)


@contextlib.contextmanager
def mineru_quiet(verbose: int) -> Iterator[None]:
    """MinerU logs every page at INFO through loguru; a command line shows warnings only (-v: all)."""
    from mineru_vram._config import patched_environ

    if verbose:
        yield
        return
    # MinerU reads MINERU_LOG_LEVEL (config field log.level) and sets LOGURU_LEVEL itself.
    quiet = {"MINERU_LOG_LEVEL": "warning", "LOGURU_LEVEL": "WARNING"}
    with patched_environ(quiet), _no_foreign_progress_bars():
        yield


@contextlib.contextmanager
def _no_foreign_progress_bars() -> Iterator[None]:
    """Turn off every tqdm bar but ours for the body (this process is the command line's own).

    MinerU's OCR and layout stages pass ``disable=False`` explicitly, which tqdm lets
    win over ``TQDM_DISABLE``; the class's ``__init__`` is wrapped instead, and restored.
    """
    try:
        from tqdm import std
    except ImportError:  # tqdm comes with MinerU; without it there is nothing to silence
        yield
        return
    original = std.tqdm.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("desc") != PROGRESS_DESC:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        std.tqdm.__init__ = original  # type: ignore[method-assign]


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
