"""Raw MinerU against ModelSession, in one run, each mode in a fresh process.

Measures, per mode, on the same documents:
  * parse time per document (warm: after one warm-up document), median of --repeat passes
  * this process's GPU memory by NVML and torch's allocated/reserved after the work
  * for raw MinerU: after MinerU's own clean_memory(), and after clearing its caches by hand
  * for ModelSession: the release receipt (release time, residual, models alive)
and, in a child of its own, the bare CUDA-context floor (one conv + one matmul).

Usage (GPU machine):
    python benchmarks/bench_session.py --models-dir /tmp/models --corpus corpus --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _nvml_process_mib() -> float | None:
    import pynvml

    pynvml.nvmlInit()
    idx = 0
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis:
        idx = int(vis.split(",")[0])
    handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == os.getpid():
            return p.usedGpuMemory / MIB
    return 0.0


def _torch_mib() -> dict[str, float]:
    import torch

    if not torch.cuda.is_initialized():
        return {"allocated": 0.0, "reserved": 0.0}
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.memory_allocated() / MIB, "reserved": torch.cuda.memory_reserved() / MIB}


def _docs(corpus: Path) -> list[Path]:
    return sorted(corpus.glob("*.pdf"))


def _mineru_env(models_dir: str, home: str) -> dict[str, str]:
    Path(home).mkdir(parents=True, exist_ok=True)
    cfg = Path(home) / "config.yaml"
    cfg.write_text(json.dumps({"model": {"base_dir": models_dir, "source": "local", "small_backend": "torch"}}))
    return {"MINERU_HOME": home, "MINERU_CONFIG": str(cfg), "MINERU_DEVICE_MODE": "cuda:0"}


def child_raw(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update(_mineru_env(args.models_dir, "/tmp/bench-raw-home"))
    from mineru.parser import parse

    docs = _docs(Path(args.corpus))
    t0 = time.perf_counter()
    first = parse(docs[0], tier="basic")
    first.markdown()
    cold = time.perf_counter() - t0
    times: dict[str, list[float]] = {d.name: [] for d in docs}
    for _ in range(args.repeat):
        for d in docs:
            t = time.perf_counter()
            r = parse(d, tier="basic")
            r.markdown()
            r.structured_content()
            times[d.name].append(time.perf_counter() - t)
    del r, first
    out: dict[str, Any] = {"cold_first_parse_s": cold, "per_doc_s": {k: statistics.median(v) for k, v in times.items()}}
    out["after_parse"] = {"nvml": _nvml_process_mib(), **_torch_mib()}
    from mineru.model.runtime.memory import clean_memory

    clean_memory("cuda:0")
    out["after_clean_memory"] = {"nvml": _nvml_process_mib(), **_torch_mib()}
    import gc

    import torch
    from mineru.model.runtime.hybrid import AtomModelSingleton, HybridLocalModelContextSingleton

    AtomModelSingleton._models.clear()
    HybridLocalModelContextSingleton._models.clear()
    gc.collect()
    torch.cuda.empty_cache()
    out["after_manual_cache_clear"] = {"nvml": _nvml_process_mib(), **_torch_mib()}
    return out


def child_session(args: argparse.Namespace) -> dict[str, Any]:
    import mineru_vram as mv

    docs = _docs(Path(args.corpus))
    before = _nvml_process_mib()
    t0 = time.perf_counter()
    s = mv.ModelSession("pipeline", device="cuda:0", models_dir=args.models_dir, isolation=args.isolation)
    s.open()
    s.parse(docs[0])
    cold = time.perf_counter() - t0
    times: dict[str, list[float]] = {d.name: [] for d in docs}
    for _ in range(args.repeat):
        for d in docs:
            t = time.perf_counter()
            s.parse(d)
            times[d.name].append(time.perf_counter() - t)
    loaded = {"nvml": _nvml_process_mib(), **_torch_mib()}
    t = time.perf_counter()
    s.close()
    exit_s = time.perf_counter() - t
    rep = s.release_report
    assert rep is not None
    return {
        "cold_first_parse_s": cold,
        "per_doc_s": {k: statistics.median(v) for k, v in times.items()},
        "nvml_before_session": before,
        "loaded": loaded,
        "close_s": exit_s,
        "after_exit": {"nvml": _nvml_process_mib(), **_torch_mib()},
        "report": {
            "seconds": rep.seconds,
            "residual_mib": rep.residual_mib,
            "models_released": rep.models_released,
            "models_alive": rep.models_alive,
            "context_created": rep.context_created,
            "worker": rep.worker,
            "text": str(rep),
        },
    }


def child_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Wrapper overhead alone: raw parse() and ModelSession.parse() on the same loaded models,
    interleaved per document in one process (order alternating per pass), so GPU clocks,
    page cache and CPU load affect both alike."""
    import mineru_vram as mv

    docs = _docs(Path(args.corpus))
    s = mv.ModelSession("pipeline", device="cuda:0", models_dir=args.models_dir).open()
    from mineru.parser import parse  # runs on the session's models: same cache keys, same device

    s.parse(docs[-1])
    parse(docs[-1], tier="basic").markdown()
    raw: dict[str, list[float]] = {d.name: [] for d in docs}
    ses: dict[str, list[float]] = {d.name: [] for d in docs}
    conv: dict[str, list[float]] = {d.name: [] for d in docs}
    for rep in range(args.repeat):
        for d in docs:
            for which in ("raw", "session") if rep % 2 == 0 else ("session", "raw"):
                t = time.perf_counter()
                if which == "raw":
                    r = parse(d, tier="basic")
                    r.markdown()
                    r.structured_content()
                    raw[d.name].append(time.perf_counter() - t)
                else:
                    res = s.parse(d)
                    ses[d.name].append(time.perf_counter() - t)
                    conv[d.name].append(res.timings.get("convert", 0.0))
    s.close()
    raw_med = {k: statistics.median(v) for k, v in raw.items()}
    ses_med = {k: statistics.median(v) for k, v in ses.items()}
    total_raw, total_ses = sum(raw_med.values()), sum(ses_med.values())
    # Paired: each document's session time against its raw time in the same pass (run back to
    # back), as a percentage of the raw time; the median and a bootstrap 95% interval of it.
    paired = [100.0 * (ses[k][i] - raw[k][i]) / raw[k][i] for k in raw for i in range(len(raw[k]))]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(paired, k=len(paired))) for _ in range(2000))
    return {
        "passes": args.repeat,
        "paired_overhead_pct_median": statistics.median(paired),
        "paired_overhead_pct_ci95": [boot[49], boot[1949]],
        "paired_n": len(paired),
        "raw_per_doc_s": raw_med,
        "session_per_doc_s": ses_med,
        "session_convert_per_doc_s": {k: statistics.median(v) for k, v in conv.items()},
        "overhead_pct": 100.0 * (total_ses - total_raw) / total_raw,
    }


def _run_child(mode: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--models-dir", args.models_dir, "--corpus", args.corpus]
    cmd += ["--repeat", str(args.repeat)] + (extra or [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    if proc.returncode != 0:
        return {"error": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--out", default=None)
    ap.add_argument("--isolation", default="none")
    ap.add_argument("--modes", default="floor,raw,session")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child == "raw":
        print(json.dumps(child_raw(args)))
        return
    if args.child == "overhead":
        print(json.dumps(child_overhead(args)))
        return
    if args.child == "session":
        print(json.dumps(child_session(args)))
        return
    import mineru_vram as mv

    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(mv.vram_snapshot("cuda:0"))}
    modes = args.modes.split(",")
    if "floor" in modes:
        result["bare_context_floor_mib"] = mv.measure_context_floor("cuda:0")
    if "raw" in modes:
        result["raw_mineru"] = _run_child("raw", args)
    if "session" in modes:
        result["model_session"] = _run_child("session", args)
    if "overhead" in modes:
        result["overhead_same_process"] = _run_child("overhead", args)
    if "isolated" in modes:
        result["model_session_isolated"] = _run_child("session", args, ["--isolation", "process"])
    raw, ses = result.get("raw_mineru", {}), result.get("model_session", {})
    if "per_doc_s" in raw and "per_doc_s" in ses:
        r, s = sum(raw["per_doc_s"].values()), sum(ses["per_doc_s"].values())
        result["parse_overhead_pct"] = 100.0 * (s - r) / r
    floor = result.get("bare_context_floor_mib")
    if floor is not None and "after_exit" in ses:
        result["session_residual_above_floor_mib"] = ses["after_exit"]["nvml"] - floor
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
