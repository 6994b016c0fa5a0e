"""``mineru-vram worker``: a task queue's worker loop."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Formatter, err

_WORKER_DESCRIPTION = """\
Run a task queue's worker loop in this process: claim tasks one at a time, parse each on one
long-lived session, record results and failures in the queue file. Settings come from the queue
file (its creator's); the flags below override them for this worker only. SIGTERM or Ctrl-C stops
it after the current task. A task that fails is recorded and the worker goes on."""

_WORKER_EPILOG = """\
exit status: 0 every task it ran completed (or was retried); 1 a task failed, or the worker could
not start or could not use the queue (each is named on stderr); 2 bad arguments or configuration.
examples:
  mineru-vram worker tasks.db --until-idle
  mineru-vram worker tasks.db --isolation process --task-timeout 300 --budget 6GiB
"""


def build_worker_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``mineru-vram worker`` arguments (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(
        prog="mineru-vram worker", description=_WORKER_DESCRIPTION, epilog=_WORKER_EPILOG, formatter_class=Formatter
    )
    p.add_argument("queue", metavar="QUEUE.db", help="the queue's SQLite file (created if missing)")
    s = p.add_argument_group("settings (default: the queue file's)")
    s.add_argument("--backend", choices=("pipeline", "flash"), help="pipeline (MinerU's models) or flash (no models)")
    s.add_argument("--device", help="cpu, cuda or cuda:N")
    s.add_argument("--models-dir", metavar="DIR", help="MinerU's model tree")
    s.add_argument("--isolation", choices=("none", "process"), help="process: parse in a supervised worker process")
    s.add_argument("--budget", help="VRAM budget per session: MiB (6144), GiB (6GiB) or a fraction (0.25, 25%%)")
    s.add_argument("--max-attempts", type=int, metavar="N", help="attempts per task before it is failed")
    s.add_argument(
        "--task-timeout",
        type=float,
        metavar="S",
        help="seconds one attempt may run (default 3600); past it the attempt is retried, and a worker "
        "without --isolation process stops (its parse cannot be interrupted)",
    )
    s.add_argument(
        "--lease", type=float, dest="lease_seconds", metavar="S", help="seconds a silent worker keeps its tasks"
    )
    s.add_argument(
        "--retry-backoff", type=float, metavar="S", help="seconds before the first retry (doubles per attempt)"
    )
    s.add_argument("--concurrency", type=int, metavar="N", help="sessions in parallel (needs --isolation process)")
    results = s.add_mutually_exclusive_group()
    results.add_argument(
        "--keep-results", dest="keep_results", action="store_true", default=None, help="keep results after retrieval"
    )
    results.add_argument(
        "--delete-results", dest="keep_results", action="store_false", help="delete a result once it is retrieved"
    )
    s.add_argument(
        "--durable", action=argparse.BooleanOptionalAction, default=None, help="fsync every commit and stored file"
    )
    r = p.add_argument_group("this run")
    r.add_argument("--until-idle", action="store_true", help="exit once no task is pending")
    r.add_argument("--max-tasks", type=int, metavar="N", help="exit after this many tasks")
    r.add_argument(
        "--poll-interval", type=float, default=0.2, metavar="S", help="seconds between looks for work while idle"
    )
    r.add_argument("-v", "--verbose", action="count", default=0, help="more logging (twice: debug, with tracebacks)")
    return p


def run_worker_cli(argv: Sequence[str] | None = None) -> int:
    """``mineru-vram worker QUEUE [flags]``: run a queue's worker loop in this process.

    Returns:
        The exit status: 0 when every task it ran completed (or was retried), 1 when a
        task failed or the worker could not start or use the queue, 2 for bad arguments
        or configuration.
    """
    return run_worker(build_worker_parser().parse_args(argv))


def run_worker(args: argparse.Namespace) -> int:
    """Run the worker from arguments parsed by :func:`build_worker_parser`; never raises."""
    from mineru_vram._exceptions import ConfigurationError, MineruVramError
    from mineru_vram._queue import QueueSettings, serve

    level = logging.WARNING - 10 * min(2, args.verbose)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Each settings flag's dest is the QueueSettings field it overrides.
    overrides = {k: getattr(args, k) for k in QueueSettings.field_names() if getattr(args, k, None) is not None}
    try:
        stats = serve(
            args.queue,
            until_idle=args.until_idle,
            max_tasks=args.max_tasks,
            poll_interval=args.poll_interval,
            **overrides,
        )
    except ConfigurationError as exc:
        err(f"mineru-vram worker: {exc}")
        return EXIT_USAGE
    except MineruVramError as exc:
        err(f"mineru-vram worker: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # a worker reports, it does not crash with a traceback (-vv logs it)
        logging.getLogger("mineru_vram").debug("the worker stopped on an unexpected error", exc_info=True)
        err(f"mineru-vram worker: stopped by an unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    err(
        f"mineru-vram worker: {stats.completed} completed, {stats.failed} failed, {stats.retried} retried, "
        f"{stats.lost} lost leases in {stats.seconds:.1f}s"
    )
    return EXIT_FAILED if stats.failed else EXIT_OK
