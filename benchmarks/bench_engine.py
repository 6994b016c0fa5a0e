"""Resident VLM engine against a cold load per document, plus sleep/wake by NVML. Prints JSON.

Usage (on a GPU machine; CPU works too, slowly)::

    python benchmarks/bench_engine.py --models-dir /tmp/rm --corpus ../shared/corpus [--out result.json]

What it measures, in one run, on one-page documents (page 1 of each corpus PDF):

* ``resident``: one transformers engine (MinerU's in-process transformers VLM
  behind the loopback endpoint) and one ``ModelSession`` for all documents; the
  time of each parse after a warm-up parse.
* ``cold_process``: what you pay without a resident engine, a fresh Python process
  per document that imports MinerU, loads the VLM and the small models, parses and
  exits (wall time from spawn to exit).
* ``cold_in_process``: a new engine and session per document in this process
  (model loads without interpreter and CUDA start-up).
* the ratios ``cold / resident`` per document (target: at least 20x for cold_process).
* ``sleep_wake``: the transformers engine's sleep and wake, and the SGLang
  STAND-IN's (a test double that really allocates and frees GPU memory; not SGLang),
  as NVML saw them, with their times. With ``--sglang-model`` and sglang installed,
  real SGLang too.

Models are random weights of the real small-model architectures
(:func:`mineru_vram.testing.write_random_models`) and a tiny random Qwen2-VL
(:func:`mineru_vram.testing.write_random_vlm`), written if missing, so no
download is needed. Random weights generate noise: ``--max-new-tokens`` bounds each
VLM answer so every configuration does the same bounded work. The VLM is tiny: loading it and
its answers both cost less than the real 1.2B model's, so the numbers measure reuse against
reloading, not MinerU 2.5's own speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, required=True, help="small-model tree (written if missing)")
    p.add_argument("--corpus", type=Path, required=True, help="folder of PDFs; page 1 of each is parsed")
    p.add_argument("--vlm-dir", type=Path, default=None, help="VLM folder (default: a tiny random Qwen2-VL)")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: first GPU, else cpu)")
    p.add_argument("--backend", default="vlm", choices=["vlm", "hybrid"], help="vlm: MinerU's advanced tier")
    p.add_argument("--docs", type=int, default=0, help="documents to use (0: all in the corpus)")
    p.add_argument("--repeat", type=int, default=2, help="resident passes over the documents")
    p.add_argument("--cold-docs", type=int, default=3, help="documents for each cold configuration")
    p.add_argument("--max-new-tokens", type=int, default=32, help="cap per VLM answer (random weights ramble)")
    p.add_argument("--standin-cap-mib", type=float, default=4096, help="GPU memory the SGLang stand-in holds")
    p.add_argument("--sglang-model", type=Path, default=None, help="also measure real SGLang with this model")
    p.add_argument("--skip-cold-process", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--cold-one", type=Path, default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


def _docs(corpus: Path, limit: int) -> list[Path]:
    docs = sorted(p for p in corpus.glob("*.pdf") if p.is_file())
    if not docs:
        raise SystemExit(f"no PDFs in {corpus}")
    return docs[:limit] if limit > 0 else docs


def _parse_one(engine: Any, args: argparse.Namespace, doc: Path) -> float:
    import mineru_vram as mv

    t0 = time.perf_counter()
    with mv.ModelSession(args.backend, engine=engine, device=args.device, models_dir=args.models_dir) as s:
        s.parse(doc, pages=1)
    return time.perf_counter() - t0


def _engine(args: argparse.Namespace) -> Any:
    from mineru_vram._engine import ResidentEngine

    return ResidentEngine(
        "transformers", model_path=args.vlm_dir, device=args.device, max_new_tokens=args.max_new_tokens
    )


def cold_one(args: argparse.Namespace) -> None:
    """Child mode: everything a one-shot process does for one document."""
    engine = _engine(args).start()
    try:
        _parse_one(engine, args, args.cold_one)
    finally:
        engine.stop()


def _summary(times: list[float]) -> dict[str, Any]:
    return {
        "n": len(times),
        "mean_s": statistics.fmean(times) if times else None,
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "max_s": max(times) if times else None,
        "each_s": [round(t, 4) for t in times],
    }


def resident(args: argparse.Namespace, docs: list[Path]) -> tuple[dict[str, Any], Any]:
    import mineru_vram as mv

    engine = _engine(args)
    t0 = time.perf_counter()
    engine.start()
    engine_start = time.perf_counter() - t0
    times: list[float] = []
    with mv.ModelSession(args.backend, engine=engine, device=args.device, models_dir=args.models_dir) as s:
        opened = time.perf_counter() - t0
        t1 = time.perf_counter()
        s.parse(docs[0], pages=1)
        warmup = time.perf_counter() - t1
        for _ in range(args.repeat):
            for doc in docs:
                t1 = time.perf_counter()
                s.parse(doc, pages=1)
                times.append(time.perf_counter() - t1)
    status = engine.status()
    out = {
        "engine_start_s": engine_start,
        "engine_and_session_open_s": opened,
        "warmup_parse_s": warmup,
        "engine_memory_mib": status.memory_mib,
        "engine_pid": status.pid,
    }
    out.update(_summary(times))
    return out, engine


def cold_in_process(args: argparse.Namespace, docs: list[Path]) -> dict[str, Any]:
    times = []
    for doc in docs[: args.cold_docs]:
        t0 = time.perf_counter()
        engine = _engine(args).start()
        try:
            _parse_one(engine, args, doc)
        finally:
            engine.stop()
        times.append(time.perf_counter() - t0)
    return _summary(times)


def cold_process(args: argparse.Namespace, docs: list[Path]) -> dict[str, Any]:
    times = []
    for doc in docs[: args.cold_docs]:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--models-dir",
            str(args.models_dir),
            "--corpus",
            str(args.corpus),
            "--vlm-dir",
            str(args.vlm_dir),
            "--device",
            args.device,
            "--backend",
            args.backend,
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--cold-one",
            str(doc),
        ]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"cold child failed on {doc}:\n{done.stderr[-4000:]}")
        times.append(elapsed)
    return _summary(times)


def _report(r: Any) -> dict[str, Any] | None:
    return None if r is None else r.to_dict()


def sleep_wake(args: argparse.Namespace, engine: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["transformers"] = {"sleep": _report(engine.sleep()), "wake": _report(engine.wake())}
    if args.device.startswith("cuda"):
        from mineru_vram import vram_snapshot
        from mineru_vram._engine import ResidentEngine
        from mineru_vram.testing._standin import StandinLauncher

        info = vram_snapshot(args.device).device_info
        budget = (args.standin_cap_mib + 512) / 1024
        standin = ResidentEngine(
            "sglang",
            model_path=args.vlm_dir,
            device=args.device,
            vram_budget_gib=budget,
            launcher=StandinLauncher(cap_mib=args.standin_cap_mib),
            start_timeout=300,
        )
        t0 = time.perf_counter()
        standin.start()
        started = time.perf_counter() - t0
        held = standin.status().memory_mib
        cycles = [{"sleep": _report(standin.sleep()), "wake": _report(standin.wake())} for _ in range(3)]
        stop = _report(standin.stop())
        out["sglang_standin"] = {
            "note": "the SGLang stand-in (mineru_vram.testing._standin), not SGLang: "
            "it holds min(fraction*total, cap) MiB",
            "device_total_mib": None if info is None else info.total_mib,
            "mem_fraction_static": standin.mem_fraction_static,
            "start_s": started,
            "held_mib": held,
            "cycles": cycles,
            "stop": stop,
        }
        if args.sglang_model is not None:
            real = ResidentEngine("sglang", model_path=args.sglang_model, device=args.device, vram_budget_gib=8)
            t0 = time.perf_counter()
            real.start()
            started = time.perf_counter() - t0
            out["sglang"] = {
                "start_s": started,
                "held_mib": real.status().memory_mib,
                "sleep": _report(real.sleep()),
                "wake": _report(real.wake()),
                "stop": _report(real.stop()),
            }
    return out


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    from importlib import metadata

    from mineru_vram import vram_snapshot

    info = vram_snapshot(args.device).device_info
    versions = {}
    for dist in ("mineru", "mineru-vram", "torch", "transformers", "sglang"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "device": args.device,
        "gpu": None if info is None else info.name,
        "gpu_total_mib": None if info is None else info.total_mib,
        "driver": None if info is None else info.driver,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "backend": args.backend,
        "max_new_tokens": args.max_new_tokens,
    }


def _keep_partial(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Write what is measured so far, so a run cut short by its time limit still leaves data."""
    if args.out is not None:
        args.out.write_text(json.dumps({**result, "partial": True}, indent=2, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from mineru_vram import testing
    from mineru_vram._probe import resolve_device

    args.device = resolve_device(args.device)
    args.models_dir = testing.write_random_models(args.models_dir).resolve()
    if args.vlm_dir is None:
        args.vlm_dir = testing.write_random_vlm(args.models_dir.parent / "tiny-qwen2-vl")
    args.vlm_dir = Path(args.vlm_dir).resolve()
    if args.cold_one is not None:
        cold_one(args)
        return 0
    docs = _docs(args.corpus, args.docs)
    print(f"bench_engine: {len(docs)} documents on {args.device}, backend {args.backend}", file=sys.stderr)
    result: dict[str, Any] = {"environment": _environment(args), "documents": [d.name for d in docs]}
    result["resident"], engine = resident(args, docs)
    try:
        result["sleep_wake"] = sleep_wake(args, engine)
    finally:
        engine.stop()
    print("bench_engine: resident and sleep/wake done; cold loads next", file=sys.stderr)
    _keep_partial(args, result)
    result["cold_in_process"] = cold_in_process(args, docs)
    _keep_partial(args, result)
    if not args.skip_cold_process:
        result["cold_process"] = cold_process(args, docs)
    base = result["resident"]["mean_s"]
    result["ratio"] = {
        name: (result[name]["mean_s"] / base if base else None)
        for name in ("cold_process", "cold_in_process")
        if name in result
    }
    result["target"] = "cold_process / resident >= 20 on one-page documents"
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
