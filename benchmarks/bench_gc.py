"""What Python's garbage collector costs a parse, with and without ``gc_freeze``.

MinerU's loaded stack is some 600,000 Python objects. A one-page parse makes enough new
long-lived objects to trigger one full collection, which walks all of them. ``gc_freeze=True``
moves what exists after loading out of the collector's generations (``gc.freeze()``).

One process, sessions one after another, alternating ``gc_freeze`` off and on (``--rounds``
of each), each parsing the same ``--pages`` first pages (the corpus's PDFs cycled) after one
warm-up page. ``gc.callbacks`` time every collection. The JSON gives, per setting: seconds of
collection per page, collections per page by generation, and the median page time.

Usage:

    python benchmarks/bench_gc.py --models-dir /tmp/mv-models --corpus ../shared/corpus --device cuda:0 --out gc.json
    python benchmarks/bench_gc.py --device cpu --corpus ../shared/corpus --pages 10   # CPU run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


class _GcClock:
    """Sums the time of every collection, and counts them by generation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.count[info["generation"]] += 1


def _round(args: Any, docs: list[Path], freeze: bool) -> dict[str, Any]:
    import mineru_vram as mv

    clock = _GcClock()
    with mv.ModelSession(
        "pipeline", device=args.device, models_dir=args.models_dir, preload="all", gc_freeze=freeze, trust_env=False
    ) as session:
        frozen = gc.get_freeze_count()
        session.parse(docs[0], pages="1")  # warm-up
        gc.callbacks.append(clock)
        try:
            times = []
            for i in range(args.pages):
                t0 = time.perf_counter()
                session.parse(docs[i % len(docs)], pages="1")
                times.append(time.perf_counter() - t0)
        finally:
            gc.callbacks.remove(clock)
        tracked = len(gc.get_objects())
    return {
        "gc_freeze": freeze,
        "frozen_objects": frozen,
        "tracked_objects": tracked,
        "gc_s_per_page": round(clock.seconds / args.pages, 4),
        "collections_per_page": [round(c / args.pages, 2) for c in clock.count],
        "median_page_s": round(statistics.median(times), 4),
        "mean_page_s": round(statistics.fmean(times), 4),
        "receipt_ok": session.release_report.ok if session.release_report else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=None, help="MinerU model tree; random weights are written if missing")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from mineru_vram._probe import resolve_device
    from mineru_vram.testing import write_random_models

    args.device = resolve_device(args.device)
    if args.models_dir is None:
        args.models_dir = str(Path.home() / ".cache" / "mineru-vram" / "random-models")
    write_random_models(args.models_dir)
    docs = sorted(Path(args.corpus).glob("*.pdf"))
    if not docs:
        sys.exit(f"no PDFs in {args.corpus}")
    rounds = [_round(args, docs, freeze) for _ in range(args.rounds) for freeze in (False, True)]
    by = {f: [r for r in rounds if r["gc_freeze"] is f] for f in (False, True)}
    summary = {
        str(f).lower(): {
            "gc_s_per_page": round(statistics.fmean(r["gc_s_per_page"] for r in rs), 4),
            "median_page_s": round(statistics.fmean(r["median_page_s"] for r in rs), 4),
        }
        for f, rs in by.items()
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": args.device,
        "python": sys.version.split()[0],
        "pages": args.pages,
        "rounds": rounds,
        "summary": summary,
        "gc_s_saved_per_page": round(summary["false"]["gc_s_per_page"] - summary["true"]["gc_s_per_page"], 4),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
