"""Warm re-entry against cold loads, in one run, each mode in a fresh process.

Modes (same one-page document, same random-weight models of MinerU's true architectures):

* ``raw``: raw MinerU, the baseline: cold first parse, then the same page again (models resident).
* ``inprocess``: ``ModelSession(keep_warm=True)`` in one process: a cold first session, then
  ``--cycles`` re-entries (enter, parse, exit). Per cycle: enter-to-ready, parse, exit, this
  process's NVML figure and torch allocated/reserved *between* sessions, host RSS; output
  compared with the cold session's.
* ``isolated``: ``ModelSession(isolation="process")`` without a spare (cold each time) and with
  ``keep_warm=True`` (a spare prepared between sessions): enter-to-ready per session, device
  memory used between sessions against the baseline, output compared.

Targets (issue): in-process re-entry enter-to-ready at most 10 % of the cold load and under 0.5 s;
isolated re-entry with a spare under 1.5 s; between sessions the process holds no more than its
CUDA context (in-process) and the device is at its baseline (isolated); no growth over 50 cycles.

Usage (GPU machine):
    python benchmarks/bench_warm.py --models-dir /tmp/mv-models --out warm.json
    python benchmarks/bench_warm.py --models-dir /tmp/mv-models --device cpu --cycles 3 --iso-cycles 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _pdf() -> bytes:
    from mineru_vram.testing import make_pdf

    return make_pdf(1)


def _nvml_process_mib(device: str, pid: int | None = None) -> float | None:
    from mineru_vram._probe import process_memory_mib

    return process_memory_mib(device, pid=pid) if device.startswith("cuda") else None


def _device_used_mib(device: str) -> float | None:
    from mineru_vram import vram_snapshot

    if not device.startswith("cuda"):
        return None
    snap = vram_snapshot(device)
    return None if snap.device_info is None else snap.device_info.used_mib


def _torch_mib(device: str) -> dict[str, float | None]:
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_initialized():
        return {"allocated": 0.0, "reserved": 0.0}
    return {"allocated": torch.cuda.memory_allocated() / MIB, "reserved": torch.cuda.memory_reserved() / MIB}


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / MIB


def _slope(ys: list[float | None]) -> float | None:
    pts = [(i, y) for i, y in enumerate(ys) if y is not None]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(i for i, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((i - mx) ** 2 for i, _ in pts)
    return sum((i - mx) * (y - my) for i, y in pts) / den if den else None


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def child_raw(args: argparse.Namespace) -> dict[str, Any]:
    home = Path("/tmp/bench-warm-raw-home")
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "config.yaml"
    cfg.write_text(json.dumps({"model": {"base_dir": args.models_dir, "source": "local", "small_backend": "torch"}}))
    os.environ.update({"MINERU_HOME": str(home), "MINERU_CONFIG": str(cfg), "MINERU_DEVICE_MODE": args.device})
    from mineru.parser import parse

    pdf_path = Path("/tmp/bench-warm.pdf")
    pdf_path.write_bytes(_pdf())
    t0 = time.perf_counter()
    first = parse(pdf_path, tier="basic")
    markdown = first.markdown()
    cold = time.perf_counter() - t0
    again = []
    for _ in range(3):
        t = time.perf_counter()
        parse(pdf_path, tier="basic").markdown()
        again.append(time.perf_counter() - t)
    return {
        "cold_first_parse_s": cold,
        "resident_parse_s": statistics.median(again),
        "cold_load_s": cold - statistics.median(again),
        "process_mib": _nvml_process_mib(args.device),
        "markdown_chars": len(markdown),
    }


def child_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    import mineru_vram as mv

    pdf = _pdf()
    device = args.device
    base_mib = _nvml_process_mib(device)
    cycles: list[dict[str, Any]] = []
    expected: str | None = None
    same = True
    for i in range(args.cycles + 1):
        t0 = time.perf_counter()
        s = mv.ModelSession("pipeline", device=device, models_dir=args.models_dir, keep_warm=True, trust_env=False)
        s.open()
        t1 = time.perf_counter()
        result = s.parse(pdf, name="a.pdf")
        t2 = time.perf_counter()
        s.close()
        t3 = time.perf_counter()
        if expected is None:
            expected = result.markdown
        else:
            same = same and result.markdown == expected
        report = s.release_report
        assert report is not None
        torch_mib = _torch_mib(device)
        cycles.append(
            {
                "cycle": i,
                "enter_s": t1 - t0,
                "parse_s": t2 - t1,
                "exit_s": t3 - t2,
                "restored_models": report.restored.get("models", 0),
                "restore_s": report.restored.get("seconds"),
                "parked_models": len(report.parked.get("models", [])),
                "parked_mib": report.parked.get("mib"),
                "parked_where": report.parked.get("where"),
                "park_s": report.parked.get("seconds"),
                "between_process_mib": _nvml_process_mib(device),
                "between_torch_allocated_mib": torch_mib["allocated"],
                "between_torch_reserved_mib": torch_mib["reserved"],
                "rss_mib": _rss_mib(),
                "receipt_ok": report.ok,
            }
        )
        print(json.dumps(cycles[-1]), file=sys.stderr, flush=True)
    cold, warm = cycles[0], cycles[1:]
    enters = [c["enter_s"] for c in warm]
    from mineru_vram._probe import measure_context_floor

    return {
        "baseline_process_mib": base_mib,
        "context_floor_mib": measure_context_floor(device) if device.startswith("cuda") else None,
        "cold_enter_s": cold["enter_s"],
        "cold_first_parse_s": cold["parse_s"],
        "warm_enter_s": _stats(enters),
        "warm_enter_over_cold": (statistics.median(enters) / cold["enter_s"]) if enters else None,
        "warm_parse_s": _stats([c["parse_s"] for c in warm]),
        "between_process_mib": _stats(
            [c["between_process_mib"] for c in cycles if c["between_process_mib"] is not None]
        ),
        "between_torch_allocated_mib_max": max(c["between_torch_allocated_mib"] or 0 for c in cycles),
        "rss_first_last_mib": [cycles[1]["rss_mib"] if warm else None, cycles[-1]["rss_mib"]],
        "rss_slope_mib_per_cycle": _slope([c["rss_mib"] for c in warm]),
        "process_mib_slope_per_cycle": _slope([c["between_process_mib"] for c in warm]),
        "same_output": same,
        "all_receipts_ok": all(c["receipt_ok"] for c in cycles),
        "cycles": cycles,
    }


def child_isolated(args: argparse.Namespace) -> dict[str, Any]:
    import mineru_vram as mv
    from mineru_vram._worker.spare import spare_pool

    pdf = _pdf()
    device = args.device
    baseline_used = _device_used_mib(device)
    out: dict[str, Any] = {"baseline_device_used_mib": baseline_used}
    expected: str | None = None
    for keep_warm in (False, True):
        rows = []
        for i in range(args.iso_cycles + (1 if keep_warm else 0)):
            if keep_warm:
                spare_pool().wait_ready(600)  # a real app has seconds between sessions; here we wait for it
            t0 = time.perf_counter()
            s = mv.ModelSession(
                "pipeline",
                device=device,
                models_dir=args.models_dir,
                isolation="process",
                keep_warm=keep_warm,
                trust_env=False,
            )
            s.open()
            t1 = time.perf_counter()
            result = s.parse(pdf, name="a.pdf")
            t2 = time.perf_counter()
            s.close()
            t3 = time.perf_counter()
            expected = expected or result.markdown
            report = s.release_report
            assert report is not None
            rows.append(
                {
                    "cycle": i,
                    "enter_s": t1 - t0,
                    "parse_s": t2 - t1,
                    "exit_s": t3 - t2,
                    "spare": report.worker.get("spare"),
                    "device_used_after_mib": report.worker.get("device_used_after_mib"),
                    "seconds_to_baseline": report.worker.get("seconds_to_baseline"),
                    "back_at_baseline": report.worker.get("back_at_baseline"),
                    "same_output": result.markdown == expected,
                    "receipt_ok": report.ok,
                }
            )
            print(json.dumps({"keep_warm": keep_warm, **rows[-1]}), file=sys.stderr, flush=True)
        taken = [r for r in rows if r["spare"]]
        out["spare" if keep_warm else "cold"] = {
            "enter_s": _stats([r["enter_s"] for r in (taken if keep_warm else rows)]),
            "parse_s": _stats([r["parse_s"] for r in (taken if keep_warm else rows)]),
            "sessions_with_spare": len(taken),
            "all_back_at_baseline": all(r["back_at_baseline"] is not False for r in rows),
            "same_output": all(r["same_output"] for r in rows),
            "all_receipts_ok": all(r["receipt_ok"] for r in rows),
            "rows": rows,
        }
    spare_pool().discard_all()
    out["device_used_end_mib"] = _device_used_mib(device)
    return out


CHILDREN = {"raw": child_raw, "inprocess": child_inprocess, "isolated": child_isolated}


def _run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--models-dir", args.models_dir, "--device", args.device]
    cmd += ["--cycles", str(args.cycles), "--iso-cycles", str(args.iso_cycles)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, check=False)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:], "seconds": time.perf_counter() - t0}
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    data["seconds"] = time.perf_counter() - t0
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--cycles", type=int, default=50, help="in-process re-entries after the cold session")
    parser.add_argument("--iso-cycles", type=int, default=3, help="isolated sessions per variant")
    parser.add_argument("--modes", default="raw,inprocess,isolated")
    parser.add_argument("--child-timeout", type=float, default=900)
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args), default=str))
        return
    result: dict[str, Any] = {"device": args.device, "date": time.strftime("%Y-%m-%d"), "cycles": args.cycles}
    for mode in args.modes.split(","):
        result[mode] = _run_child(mode, args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    raw, inp, iso = result.get("raw", {}), result.get("inprocess", {}), result.get("isolated", {})
    summary = {
        "raw_cold_load_s": raw.get("cold_load_s"),
        "inprocess_cold_enter_s": inp.get("cold_enter_s"),
        "inprocess_warm_enter_median_s": (inp.get("warm_enter_s") or {}).get("median"),
        "inprocess_warm_over_cold": inp.get("warm_enter_over_cold"),
        "isolated_cold_enter_median_s": ((iso.get("cold") or {}).get("enter_s") or {}).get("median"),
        "isolated_spare_enter_median_s": ((iso.get("spare") or {}).get("enter_s") or {}).get("median"),
        "same_output": [
            inp.get("same_output"),
            (iso.get("cold") or {}).get("same_output"),
            (iso.get("spare") or {}).get("same_output"),
        ],
    }
    result["summary"] = summary
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
