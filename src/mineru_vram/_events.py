"""Phase events: where a session is in its life, for timelines and anyone else listening.

Sessions call :func:`emit` at their phase boundaries (``load.start`` / ``load.end``,
``parse.start`` / ``parse.end`` with the document's name, ``release.start`` /
``release.end``). Two kinds of listeners:

* in this process, callbacks registered with :func:`subscribe` (a
  :class:`~mineru_vram.Timeline` in a notebook);
* in another process, a file named by ``MINERU_VRAM_TIMELINE_EVENTS``: each event is
  appended to it as one JSON line (``mineru-vram timeline -- COMMAND`` sets it for
  the command it runs). The variable is read on every ``emit``, never at import.

With nobody listening, ``emit`` costs one tuple check and one environment lookup.
A listener that fails never breaks the session that emitted: errors are logged at
debug level and dropped.

Each event is a dict: ``event`` (the name), ``time`` (``time.time()``), ``pid``,
and the keyword arguments given to ``emit``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ._config import getenv

__all__ = ["ENV_EVENTS_FILE", "Event", "emit", "subscribe"]

logger = logging.getLogger("mineru_vram")

ENV_EVENTS_FILE = "MINERU_VRAM_TIMELINE_EVENTS"

Event = dict[str, Any]
Callback = Callable[[Event], None]

_lock = threading.Lock()
# Replaced, never mutated, under _lock: emit() reads it without locking.
_subscribers: tuple[Callback, ...] = ()


def subscribe(callback: Callback) -> Callable[[], None]:
    """Call ``callback(event)`` for every event emitted in this process from now on.

    The callback runs in the emitting thread, synchronously: keep it short.

    Returns:
        A function that unsubscribes ``callback`` (idempotent).
    """
    global _subscribers
    with _lock:
        _subscribers = (*_subscribers, callback)

    def unsubscribe() -> None:
        global _subscribers
        with _lock:
            subs = list(_subscribers)
            if callback in subs:
                subs.remove(callback)
                _subscribers = tuple(subs)

    return unsubscribe


def emit(event: str, /, *, trust_env: bool = True, **info: Any) -> None:
    """Tell listeners that ``event`` happened now. Never raises.

    ``trust_env=False`` (a session's setting) leaves out the events file that
    ``MINERU_VRAM_EVENTS_FILE`` names; listeners in this process still hear it.
    """
    subscribers = _subscribers
    path = getenv(ENV_EVENTS_FILE) if trust_env else None
    if not subscribers and not path:
        return
    record: Event = {"event": event, "time": time.time(), "pid": os.getpid(), **info}
    for callback in subscribers:
        try:
            callback(record)
        except Exception:
            logger.debug("phase event listener %r failed on %s", callback, event, exc_info=True)
    if path:
        _append(path, record)


def _append(path: str, record: Event) -> None:
    # One write(2) of one line on an O_APPEND descriptor: lines from several processes
    # (a session and its isolated workers) never interleave.
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        logger.debug("cannot open the timeline events file %s", path, exc_info=True)
        return
    try:
        os.write(fd, line)
    except OSError:
        logger.debug("cannot write to the timeline events file %s", path, exc_info=True)
    finally:
        os.close(fd)


def read_events(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[Event], int]:
    """Read complete JSON lines from ``path`` starting at byte ``offset``.

    A line still being written (no newline yet) is left for the next call.

    Returns:
        ``(events, new_offset)``.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events: list[Event] = []
    for raw in data[: end + 1].splitlines():
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            logger.debug("skipping a malformed timeline event line: %r", raw[:200])
            continue
        if isinstance(value, dict) and "event" in value and "time" in value:
            events.append(value)
    return events, offset + end + 1
