"""Process isolation against raw MinerU and the in-process session, in one run.

Each mode runs in a fresh child process of this script, which itself only reads
NVML (it never creates a CUDA context), so device figures are not disturbed by
the harness:

* ``raw``: MinerU's own ``parse`` on the corpus; what the process holds after the
  work and after MinerU's ``clean_memory``; then, when the child exits (the
  users' standing workaround: restart the process), how long until the device is
  back at its pre-child level.
* ``session``: ``ModelSession(isolation="none")``: per-document times, this
  process's NVML figure after ``__exit__`` (the CUDA context stays).
* ``isolated``: ``ModelSession(isolation="process")``: per-document times, the
  per-document cost of isolation (wall time minus the worker's own MinerU and
  conversion time, and against the in-process median), the parent's NVML figure
  after exit, the worker's, the time from ``__exit__`` to the device back at its
  baseline (measured here and as the receipt says), and a long run of
  ``--docs`` documents (the corpus repeated, ``--long-pages`` pages each) with one
  memory sample per document to show memory stays flat.

Prints one JSON summary on stdout (also written to ``--out``).

Usage (GPU machine):
    python benchmarks/bench_isolation.py --models-dir /tmp/models --corpus ../shared/corpus --out iso.json
    python benchmarks/bench_isolation.py ... --docs 200 --recycle-above-mib 512 --modes isolated
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


# --- NVML, read without a CUDA context -------------------------------------------------------


def _device_used_mib(device: str) -> float | None:
    from mineru_vram import vram_snapshot

    if not device.startswith("cuda"):
        return None
    info = vram_snapshot(device).device_info
    return None if info is None else info.used_mib


def _process_mib(device: str, pid: int | None = None) -> float | None:
    from mineru_vram._probe import process_memory_mib

    return process_memory_mib(device, pid=pid)


def _torch_mib() -> dict[str, float | None]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {"allocated": None, "reserved": None}
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.memory_allocated() / MIB, "reserved": torch.cuda.memory_reserved() / MIB}


def _docs(corpus: Path) -> list[Path]:
    docs = sorted(corpus.glob("*.pdf"))
    if not docs:
        raise SystemExit(f"no PDFs in {corpus}")
    return docs


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _slope(ys: list[float | None]) -> float | None:
    """Least-squares slope per sample (MiB per document) over the values present."""
    pts = [(float(i), float(y)) for i, y in enumerate(ys) if y is not None]
    if len(pts) < 3:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in pts) / den


def _series_summary(ys: list[float | None]) -> dict[str, Any]:
    vals = [y for y in ys if y is not None]
    if not vals:
        return {"n": 0}
    k = max(1, min(10, len(vals) // 4))
    half = ys[len(ys) // 2 :]
    return {
        "n": len(vals),
        "first": vals[0],
        "first_mean": statistics.fmean(vals[:k]),
        "last_mean": statistics.fmean(vals[-k:]),
        "max": max(vals),
        "min": min(vals),
        "slope_mib_per_doc": _slope(ys),
        "slope_second_half_mib_per_doc": _slope(half),
    }


# --- children ----------------------------------------------------------------------------------


def _mineru_env(models_dir: str, home: str, device: str) -> dict[str, str]:
    Path(home).mkdir(parents=True, exist_ok=True)
    cfg = Path(home) / "config.yaml"
    cfg.write_text(json.dumps({"model": {"base_dir": models_dir, "source": "local", "small_backend": "torch"}}))
    return {"MINERU_HOME": home, "MINERU_CONFIG": str(cfg), "MINERU_DEVICE_MODE": device}


def child_raw(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update(_mineru_env(args.models_dir, f"/tmp/bench-iso-raw-home-{os.getpid()}", args.device))
    from mineru.parser import parse

    from mineru_vram._config import resolve_backend

    tier = resolve_backend(args.backend).tier
    docs = _docs(Path(args.corpus))
    t0 = time.perf_counter()
    parse(docs[0], tier=tier).markdown()
    cold = time.perf_counter() - t0
    times: dict[str, list[float]] = {d.name: [] for d in docs}
    for _ in range(args.repeat):
        for d in docs:
            t = time.perf_counter()
            r = parse(d, tier=tier)
            r.markdown()
            r.structured_content()
            times[d.name].append(time.perf_counter() - t)
            del r
    out: dict[str, Any] = {
        "cold_first_parse_s": cold,
        "per_doc_s": {k: _median(v) for k, v in times.items()},
        "after_parse": {"nvml": _process_mib(args.device), **_torch_mib()},
    }
    from mineru.model.runtime.memory import clean_memory

    clean_memory(args.device)
    out["after_clean_memory"] = {"nvml": _process_mib(args.device), **_torch_mib()}
    return out


def child_session(args: argparse.Namespace) -> dict[str, Any]:
    import mineru_vram as mv

    isolated = args.isolation == "process"
    docs = _docs(Path(args.corpus))
    device_before = _device_used_mib(args.device)
    t0 = time.perf_counter()
    s = mv.ModelSession(
        args.backend,
        device=args.device,
        models_dir=args.models_dir,
        isolation=args.isolation,
        recycle_after=args.recycle_after if isolated else None,
        recycle_above_mib=args.recycle_above_mib if isolated else None,
        trust_env=False,
    )
    s.__enter__()
    open_s = time.perf_counter() - t0
    s.parse(docs[0])
    cold = time.perf_counter() - t0
    times: dict[str, list[float]] = {d.name: [] for d in docs}
    outside_mineru: dict[str, list[float]] = {d.name: [] for d in docs}
    for _ in range(args.repeat):
        for d in docs:
            t = time.perf_counter()
            r = s.parse(d)
            wall = time.perf_counter() - t
            times[d.name].append(wall)
            # Wall time minus the runner's own MinerU + conversion time: validation plus,
            # when isolated, the trip to the worker and back.
            outside_mineru[d.name].append(wall - sum(r.timings.values()))
    out: dict[str, Any] = {
        "open_s": open_s,
        "cold_first_parse_s": cold,
        "per_doc_s": {k: _median(v) for k, v in times.items()},
        "per_doc_outside_mineru_s": {k: _median(v) for k, v in outside_mineru.items()},
        "this_process_loaded": {"nvml": _process_mib(args.device), **_torch_mib()},
    }
    runner: Any = s.runner
    worker_pid = getattr(runner, "pid", None)
    if isolated:
        out["worker_loaded_nvml"] = _process_mib(args.device, worker_pid)
        if args.docs > 0:
            out["long_run"] = _long_run(s, docs, args)
            worker_pid = getattr(runner, "pid", None) or worker_pid
    device_loaded = _device_used_mib(args.device)
    t = time.perf_counter()
    s.__exit__(None, None, None)
    exit_s = time.perf_counter() - t
    # Independent of the receipt: how long, from the end of __exit__, until NVML shows
    # the device at its pre-session level (the receipt already waited for it).
    back_s = _wait_device(args.device, device_before, args.tolerance_mib, timeout=30.0)
    rep = s.release_report
    assert rep is not None
    out.update(
        {
            "device_used_before_mib": device_before,
            "device_used_loaded_mib": device_loaded,
            "exit_s": exit_s,
            "device_back_after_exit_returned_s": back_s,
            "device_used_after_exit_mib": _device_used_mib(args.device),
            "this_process_after_exit": {"nvml": _process_mib(args.device), **_torch_mib()},
            "cuda_initialised_here": bool(sys.modules.get("torch") and sys.modules["torch"].cuda.is_initialized()),
            "report": {
                "text": str(rep),
                "ok": rep.ok,
                "seconds": rep.seconds,
                "residual_mib": rep.residual_mib,
                "models_released": rep.models_released,
                "models_alive": rep.models_alive,
                "context_created": rep.context_created,
                "events": rep.events,
                "worker": {k: v for k, v in rep.worker.items() if k != "history"},
            },
        }
    )
    if isolated:
        out["worker_after_exit_nvml"] = _process_mib(args.device, worker_pid)
    return out


def _long_run(s: Any, docs: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    runner = s.runner
    already = len(runner.samples)
    pages = args.long_pages or None
    counts = {d: s.load(d).page_count for d in docs}
    walls: list[float] = []
    device_used: list[float | None] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    for i in range(args.docs):
        d = docs[i % len(docs)]
        t = time.perf_counter()
        try:
            s.parse(d, pages=None if pages is None else f"1-{min(pages, counts[d])}")
        except Exception as exc:  # a long run reports failures instead of stopping
            errors.append(f"{i}: {d.name}: {type(exc).__name__}: {exc}"[:300])
        walls.append(time.perf_counter() - t)
        device_used.append(_device_used_mib(args.device))
    total = time.perf_counter() - t0
    samples = list(runner.samples)[already:]
    rss = [x.get("rss_mib") for x in samples]
    dev = [x.get("device_mib") for x in samples]
    return {
        "docs": args.docs,
        "pages_per_doc": f"1-{pages}" if pages else "all",
        "seconds": total,
        "per_doc_s_median": _median(walls),
        "errors": errors,
        "worker_rss_mib": _series_summary(rss),
        "worker_device_mib": _series_summary(dev),
        "device_used_mib": _series_summary(device_used),
        "recycles": runner.recycles,
        "restarts": runner.restarts,
        "samples": {
            "pid": [x.get("pid") for x in samples],
            "rss_mib": [None if v is None else round(v, 1) for v in rss],
            "worker_device_mib": [None if v is None else round(v, 1) for v in dev],
            "device_used_mib": [None if v is None else round(v, 1) for v in device_used],
            "seconds": [round(w, 3) for w in walls],
        },
    }


def _wait_device(device: str, target: float | None, tolerance: float, *, timeout: float) -> float | None:
    if target is None:
        return None
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        used = _device_used_mib(device)
        if used is not None and used <= target + tolerance:
            return time.perf_counter() - t0
        time.sleep(0.01)
    return None


def _run_child(mode: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict[str, Any]:
    """Run one mode in a fresh process; measure, from here, the device after that process exits."""
    cmd = [sys.executable, __file__, "--child", mode, "--models-dir", args.models_dir, "--corpus", args.corpus]
    cmd += ["--repeat", str(args.repeat), "--device", args.device, "--docs", str(args.docs), "--backend", args.backend]
    cmd += ["--long-pages", str(args.long_pages), "--tolerance-mib", str(args.tolerance_mib)]
    if args.recycle_after is not None:
        cmd += ["--recycle-after", str(args.recycle_after)]
    if args.recycle_above_mib is not None:
        cmd += ["--recycle-above-mib", str(args.recycle_above_mib)]
    cmd += extra or []
    device_before = _device_used_mib(args.device)
    # stderr (MinerU's progress lines) goes to a file: a pipe nobody drains would block the child.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        assert proc.stdin is not None
        try:
            line = _readline(proc, args.timeout)
            if not line:
                proc.kill()
                proc.wait()
                log.seek(0)
                return {"error": proc.returncode, "stderr_tail": log.read().decode(errors="replace")[-3000:]}
            out: dict[str, Any] = json.loads(line)
            # The child waits on stdin before exiting, so the process's exit can be timed from here.
            t0 = time.perf_counter()
            proc.stdin.close()
            proc.wait(timeout=120)
            exited = time.perf_counter() - t0
            back = _wait_device(args.device, device_before, args.tolerance_mib, timeout=30.0)
            out["process_exit"] = {
                "device_used_before_child_mib": device_before,
                "exit_s": exited,
                "device_back_after_exit_s": back,
                "device_used_after_child_mib": _device_used_mib(args.device),
            }
            return out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=1.0):
            return proc.stdout.readline()
        if proc.poll() is not None:
            return proc.stdout.readline()
    return ""


def _child_entry(args: argparse.Namespace) -> None:
    out = child_raw(args) if args.child == "raw" else child_session(args)
    print(json.dumps(out), flush=True)
    sys.stdin.read()  # exit when the parent says so, so it can time the exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", required=True, help="MinerU model tree (base_dir, source=local)")
    ap.add_argument("--corpus", required=True, help="folder of PDFs")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--backend", default="pipeline", help="pipeline (MinerU's basic tier) or flash (no models)")
    ap.add_argument("--repeat", type=int, default=1, help="timed passes over the corpus per mode")
    ap.add_argument("--docs", type=int, default=200, help="documents in the isolated long run (0: skip)")
    ap.add_argument("--long-pages", type=int, default=1, help="pages per document in the long run (0: all)")
    ap.add_argument("--recycle-after", type=int, default=None)
    ap.add_argument("--recycle-above-mib", type=float, default=None)
    ap.add_argument("--tolerance-mib", type=float, default=32.0, help="'back at baseline' tolerance")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mode")
    ap.add_argument("--modes", default="raw,session,isolated")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--isolation", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child_entry(args)
        return
    import mineru_vram as mv

    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(mv.vram_snapshot(args.device)),
        "corpus": [p.name for p in _docs(Path(args.corpus))],
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "isolation")},
    }
    modes = args.modes.split(",")

    def keep(key: str, value: dict[str, Any]) -> None:
        # Written after every mode, so a run cut short by its time limit still leaves data.
        result[key] = value
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    if "raw" in modes:
        keep("raw_mineru", _run_child("raw", args))
    if "session" in modes:
        keep("session_in_process", _run_child("session", args, ["--isolation", "none", "--docs", "0"]))
    if "isolated" in modes:
        keep("session_isolated", _run_child("session", args, ["--isolation", "process"]))
    result["summary"] = _summary(result)
    result["total_s"] = time.perf_counter() - t_all
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    raw = result.get("raw_mineru", {})
    ses = result.get("session_in_process", {})
    iso = result.get("session_isolated", {})
    out: dict[str, Any] = {}
    if "per_doc_s" in ses and "per_doc_s" in iso:
        per_doc = {k: iso["per_doc_s"][k] - v for k, v in ses["per_doc_s"].items() if k in iso["per_doc_s"]}
        out["isolation_overhead_per_doc_s"] = per_doc
        out["isolation_overhead_median_s"] = _median(list(per_doc.values()))
        out["isolated_outside_mineru_median_s"] = _median(list(iso["per_doc_outside_mineru_s"].values()))
        out["in_process_outside_mineru_median_s"] = _median(list(ses["per_doc_outside_mineru_s"].values()))
    if "per_doc_s" in raw and "per_doc_s" in iso:
        r, i = sum(raw["per_doc_s"].values()), sum(iso["per_doc_s"].values())
        out["isolated_vs_raw_pct"] = 100.0 * (i - r) / r
    out["nvml_after_exit_mib"] = {
        "raw_mineru_after_work": raw.get("after_parse", {}).get("nvml"),
        "raw_mineru_after_clean_memory": raw.get("after_clean_memory", {}).get("nvml"),
        "in_process_session": ses.get("this_process_after_exit", {}).get("nvml"),
        "isolated_parent": iso.get("this_process_after_exit", {}).get("nvml"),
        "isolated_worker": iso.get("worker_after_exit_nvml"),
    }
    out["exit_to_device_back_s"] = {
        "raw_mineru_process_exit": raw.get("process_exit", {}).get("device_back_after_exit_s"),
        "isolated_exit_total": iso.get("exit_s"),
        "isolated_receipt_seconds_to_baseline": iso.get("report", {}).get("worker", {}).get("seconds_to_baseline"),
        "isolated_after_exit_returned": iso.get("device_back_after_exit_returned_s"),
    }
    if iso.get("device_used_before_mib") is not None and iso.get("device_used_after_exit_mib") is not None:
        out["isolated_device_residual_mib"] = iso["device_used_after_exit_mib"] - iso["device_used_before_mib"]
    long = iso.get("long_run")
    if long:
        out["long_run"] = {
            k: long[k]
            for k in ("docs", "pages_per_doc", "seconds", "per_doc_s_median", "recycles", "restarts")
            if k in long
        }
        out["long_run"]["errors"] = len(long.get("errors", []))
        for key in ("worker_rss_mib", "worker_device_mib", "device_used_mib"):
            s = long.get(key, {})
            out["long_run"][key] = {k: s.get(k) for k in ("first_mean", "last_mean", "max", "slope_mib_per_doc")}
    return out


if __name__ == "__main__":
    main()
