"""``mineru-vram timeline``: run a command and record device memory while it runs."""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import EXIT_USAGE, err


def cmd_timeline(args: argparse.Namespace) -> int:
    from mineru_vram._config import child_environ
    from mineru_vram._events import ENV_EVENTS_FILE
    from mineru_vram._exceptions import ConfigurationError
    from mineru_vram._timeline import Timeline

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        err("mineru-vram timeline: no command given; usage: mineru-vram timeline [-o DIR] -- COMMAND...")
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    events.unlink(missing_ok=True)
    title = args.title or " ".join([Path(cmd[0]).name, *cmd[1:]])
    try:
        tl = Timeline(device=args.device, hz=args.hz, pids=[], events_file=events, listen=False, title=title[:120])
    except ConfigurationError as exc:
        err(f"mineru-vram timeline: {exc}")
        return EXIT_USAGE
    # The command alone gets the variable: its sessions append their phases to the file.
    env = child_environ({ENV_EVENTS_FILE: str(events.resolve())})
    try:
        proc = subprocess.Popen(cmd, env=env)
    except OSError as exc:
        err(f"mineru-vram timeline: cannot run {cmd[0]!r}: {exc}")
        return 127
    tl.follow(proc.pid)
    tl.start()
    tl.mark("start", command=" ".join(cmd))
    rc = _wait_forwarding_signals(proc)
    tl.mark("exit", returncode=rc)
    time.sleep(max(0.0, args.tail))
    tl.stop()
    tl.to_csv(out / "timeline.csv")
    tl.to_csv(out / "phases.csv", phases=True)
    written = [out / "timeline.csv", out / "phases.csv", events]
    try:
        tl.plot(out / "timeline.png")
        written.insert(0, out / "timeline.png")
    except ImportError as exc:
        err(f"mineru-vram timeline: no PNG: {exc}")
    print(f"mineru-vram timeline: {tl.summary()}", file=sys.stderr)
    print("mineru-vram timeline: wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return rc if rc >= 0 else 128 - rc


def _wait_forwarding_signals(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the command; pass SIGTERM on to it, and let Ctrl-C reach it (same process group)."""
    previous: dict[int, Any] = {}

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    with contextlib.suppress(ValueError):  # not the main thread: no handlers, plain wait
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                # The terminal sent SIGINT to the command as well; keep waiting for it to finish,
                # so the timeline records its exit.
                continue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
