"""The work drawn in docs/timeline.md's pictures: the same documents, one mode per run.

Run it under ``mineru-vram timeline`` (make_timelines.sh does, for every mode):

    python docs/timelines/timeline_workload.py --mode session --models-dir M a.pdf b.pdf

Modes:
  raw       MinerU's own ``mineru.parser.parse`` (basic tier): models load on the first parse and stay.
  session   ``ModelSession("pipeline")`` in this process: load, parse, release (the context stays).
  isolated  ``ModelSession("pipeline", isolation="process")``: the models live in a worker that exits.
  engine    a ``ResidentEngine`` (MinerU's transformers VLM, random weights) shared by a ``hybrid``
            session: start, parse, sleep, stop.

The documents are parsed twice (``--passes``), so the picture shows whether memory comes
back to the same level from one pass to the next. Sessions load every model at open
(``preload="all"``), so their load phase holds the models; raw MinerU loads them lazily
during its first parse, as it does. Every mode ends with two idle seconds, so the picture
shows what stays after the work. Phases that mineru-vram does not mark itself (raw MinerU's
parses, the engine's steps, the idle tail) are marked here through the same events file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mineru_vram._events import emit


@contextlib.contextmanager
def phase(name: str, **info: object) -> Iterator[None]:
    emit(f"{name}.start", **info)
    try:
        yield
    finally:
        emit(f"{name}.end", **info)


def idle(seconds: float) -> None:
    with phase("idle"):
        time.sleep(seconds)


def raw(args: argparse.Namespace) -> None:
    # MinerU reads its configuration at import: point it at the models first.
    home = tempfile.mkdtemp(prefix="timeline-raw-home-")
    config = Path(home) / "config.yaml"
    model = {"base_dir": args.models_dir, "source": "local", "small_backend": "torch"}
    config.write_text(json.dumps({"model": model}), encoding="utf-8")
    os.environ.update({"MINERU_HOME": home, "MINERU_CONFIG": str(config), "MINERU_DEVICE_MODE": args.device})
    from mineru.parser import parse

    tier = "flash" if args.backend == "flash" else "basic"
    for doc in args.docs * args.passes:
        with phase("parse", document=doc):
            result = parse(doc, tier=tier)
            result.markdown()
            result.structured_content()
    del result


def session(args: argparse.Namespace, isolation: str) -> None:
    from mineru_vram import ModelSession

    with ModelSession(
        args.backend, device=args.device, models_dir=args.models_dir, isolation=isolation, preload=args.preload
    ) as s:
        for doc in args.docs * args.passes:
            s.parse(doc)
    print(s.release_report, flush=True)


def engine(args: argparse.Namespace) -> None:
    from mineru_vram import ModelSession, ResidentEngine

    eng = ResidentEngine("transformers", model_path=args.vlm_dir, device=args.device, max_new_tokens=64)
    with phase("engine start"):
        eng.start()
    try:
        with ModelSession(
            "hybrid", engine=eng, device=args.device, models_dir=args.models_dir, preload=args.preload
        ) as s:
            for doc in args.docs * args.passes:
                s.parse(doc)
        print(s.release_report, flush=True)
        with phase("engine sleep"):
            print(eng.sleep(), flush=True)
        idle(1.0)
    finally:
        with phase("engine stop"):
            print(eng.stop(), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("raw", "session", "isolated", "engine"), required=True)
    p.add_argument("--models-dir", required=True, help="MinerU model tree (write_random_models)")
    p.add_argument("--vlm-dir", help="VLM model directory for --mode engine (write_random_vlm)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--backend", choices=("pipeline", "flash"), default="pipeline", help="flash: a CPU smoke run")
    p.add_argument("--idle", type=float, default=2.0, help="idle seconds at the end")
    p.add_argument("--passes", type=int, default=2, help="times the documents are parsed (pass 2 shows any growth)")
    p.add_argument(
        "--preload", choices=("core", "all"), default="all", help="sessions: load every model at open (not raw MinerU)"
    )
    p.add_argument("docs", nargs="+")
    args = p.parse_args()
    if args.mode == "raw":
        raw(args)
    elif args.mode == "engine":
        if not args.vlm_dir:
            p.error("--mode engine needs --vlm-dir")
        engine(args)
    else:
        session(args, "process" if args.mode == "isolated" else "none")
    idle(args.idle)


if __name__ == "__main__":
    main()
