"""MinerU's PDF renderer (docvortex): how its page-render workers are spawned, its pdfium lock, stopping them."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

# pypdfium2 logs "Explicitly closing <PdfBitmap ...>. This is a potentially unsafe operation!" at
# WARNING each time MinerU's renderer closes a page bitmap it made (pypdfium2 >= 5.14); nothing a
# user can act on. Quieted while sessions are open, here and in the render workers.
_PDFIUM_BITMAP_LOGGER = "pypdfium2._helpers.bitmap"

# Threads inside a parse of ours: processes they spawn do not re-run the user's __main__.
spawn_scope = threading.local()


@contextlib.contextmanager
def main_free_spawn() -> Iterator[None]:
    """While the body runs, ``spawn`` children started inside a parse skip the parent's ``__main__``.

    multiprocessing's ``spawn`` child first re-runs the parent's main script (or
    module) as ``__mp_main__``, so that functions defined there can be unpickled.
    An unguarded script (no ``if __name__ == "__main__":``) then runs again in the
    child: a second session, a second parse, and the render worker never answers.
    MinerU's render workers run docvortex functions only, so for processes started
    from a thread inside :meth:`MineruRuntime.parse` the preparation data leaves
    ``__main__`` out, exactly as it does for ``python -c``. Processes started
    anywhere else (the user's own) are untouched.

    The same children are started isolated (``python -I``): a plain ``python -c``
    puts the current folder first on ``sys.path`` while it imports
    ``multiprocessing``, so a ``multiprocessing.py`` or ``json.py`` in the folder the
    user ran from would run inside MinerU's render workers. They get the parent's
    import path from the preparation data instead, minus the current folder.
    """
    from multiprocessing import spawn, util

    from mineru_vram._process import child_sys_path

    original = spawn.get_preparation_data
    original_flags = util._args_from_interpreter_flags  # type: ignore[attr-defined]

    def interpreter_flags() -> list[str]:
        # multiprocessing builds every child's command line from these flags: the spawn
        # children and its resource tracker, both started with ``-c``.
        flags: list[str] = original_flags()
        if getattr(spawn_scope, "depth", 0) > 0 and "-I" not in flags:
            flags = ["-I", *flags]
        return flags

    def get_preparation_data(name: str) -> dict[str, Any]:
        data: dict[str, Any] = original(name)
        if getattr(spawn_scope, "depth", 0) > 0:
            data.pop("init_main_from_path", None)
            # Instead of the user's __main__, the child runs a module of ours that only quiets
            # pypdfium2's per-bitmap "potentially unsafe operation" warning there (see below).
            data["init_main_from_name"] = "mineru_vram._render_child"
            data["sys_path"] = child_sys_path()
        return data

    spawn.get_preparation_data = get_preparation_data
    util._args_from_interpreter_flags = interpreter_flags  # type: ignore[attr-defined]
    bitmap_log = logging.getLogger(_PDFIUM_BITMAP_LOGGER)
    level = bitmap_log.level
    bitmap_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bitmap_log.setLevel(level)
        if spawn.get_preparation_data is get_preparation_data:
            spawn.get_preparation_data = original
        if util._args_from_interpreter_flags is interpreter_flags:  # type: ignore[attr-defined]
            util._args_from_interpreter_flags = original_flags  # type: ignore[attr-defined]


def mineru_pdfium_lock() -> Any:
    """The lock MinerU's PDF layer (docvortex) holds around its pdfium calls; ``None`` before it is loaded.

    pdfium is not thread-safe and keeps one last-error code for the whole process. The
    library's own pdfium calls (input verdicts) also take this lock once MinerU's PDF layer
    is loaded, so a parse in another thread cannot run pdfium between a failed load and
    the read of its error code. Looked up in ``sys.modules``, never imported: before
    MinerU's PDF layer is imported, none of its pdfium calls can run.
    """
    module = sys.modules.get("docvortex.document.pdf.pdfium")
    return getattr(module, "_pdfium_lock", None)


def stop_render_workers() -> None:
    """Stop the PDF render worker processes MinerU (docvortex) started for parsing.

    They hold no device memory, but stay alive as children of this process until its
    atexit hook; with the last session closed nothing of ours should be left running.
    """
    module = sys.modules.get("docvortex.document.pdf.render_session")
    shutdown = getattr(module, "shutdown_pdf_render_sessions", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # cleanup must not mask the release; the atexit hook retries
            pass
