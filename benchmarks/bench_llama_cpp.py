"""The llama-cpp resident engine: memory and time of each step, and resident against cold. Prints JSON.

Usage (on a GPU machine with the Vulkan loader; see the device README's ``.gl`` recipe)::

    python benchmarks/bench_llama_cpp.py --corpus ../shared/corpus --out result.json
    # CPU, small counts (the tiny pair parses in seconds; the full pair's vision tower takes minutes a page):
    python benchmarks/bench_llama_cpp.py --device cpu --size tiny --docs 2 --repeat 1 --cold-docs 1
    python benchmarks/bench_llama_cpp.py --device cpu --size full --no-parse

The model is :func:`mineru_vram.testing.write_random_vlm_gguf` (``--size full``: MinerU2.5's
widths and vocabulary at Q8_0, 642 + 674 MB, random weights scripted to a short answer), so
memory and load times are those of the real pair, and answers are short. Small models are
random weights of MinerU's real architectures (:func:`mineru_vram.testing.write_random_models`).
All measured in one run, on one device:

* ``baseline``: NVML's device figures before anything starts (and ``after_stop``: the same
  once everything stopped), so every other figure has its zero beside it.
* ``steps``: the engine's ``llama-server`` loaded (after start, and after the first parse),
  asleep (``sleep()``: the server is stopped), awake (``wake()``: started again), stopped.
  Each with its wall time, NVML's figure for the server's processes (both the compute and
  the graphics process lists: a Vulkan process may show in either) and the server's RSS.
  ``same_output_after_wake``: the same page parses to the same markdown after the wake.
* ``server_log``: the memory lines of llama-server's own log (``-lv 4``): what it put where.
* ``plan``: the layers, context and slots the engine chose, and its estimate of device memory.
* ``native_sleep``: llama-server's own sleep (``--sleep-idle-seconds``) on the same flags:
  memory loaded, asleep and after the request that wakes it, and that request's time (the
  evidence for stopping the server instead; ``--skip-native-sleep`` leaves it out).
* ``resident``: one engine and one ``ModelSession`` for every document (page 1 of each
  corpus PDF): each parse's time after a warm-up parse.
* ``cold_in_process`` and ``cold_process``: per document, start the server, open a session,
  parse, stop (in this process; in a fresh Python process, interpreter start included).
* ``ratio``: cold / resident per document.

``--inprocess-session`` measures the other way MinerU runs llama.cpp, instead of all of the above:
``ModelSession(backend="vlm", engine="llama-cpp")``, MinerU's own ``mineru_llama_cpp.Engine`` inside
this process for the length of a session (MinerU's sizing: every layer on the device, 4 slots of the
training context). The models folder is a temporary tree linking the small models and the GGUF pair
under MinerU's names. Output ``inprocess_session``: per cycle (``--session-cycles``), the wall time of
open (small models + engine), of each parse and of close; this process's memory at each step
(``baseline``, ``loaded``, ``after_parses``, ``after_close``): NVML's compute and graphics process
lists for this pid read separately (the Vulkan engine may appear only in the graphics list, torch's
CUDA context in the compute list), the device's figures and RSS; the session's receipt
(``ReleaseReport.to_dict()`` and its text) and ``same_output`` (the first page's markdown equal in
every cycle). CPU: ``--device cpu --size tiny --docs 1 --inprocess-session``.
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
    p.add_argument("--corpus", type=Path, default=None, help="folder of PDFs; page 1 of each is parsed")
    p.add_argument("--gguf-dir", type=Path, default=None, help="GGUF folder, used as is (default: a random pair)")
    p.add_argument("--size", default="full", choices=["tiny", "full"], help="the random pair's size (no --gguf-dir)")
    p.add_argument("--models-dir", type=Path, default=None, help="small-model tree (default: the random one)")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: first GPU, else cpu)")
    p.add_argument("--budget-mib", type=float, default=None, help="the engine's budget (sizes layers/context/slots)")
    p.add_argument("--threads", type=int, default=None, help="llama-server --threads (default: its own)")
    p.add_argument("--docs", type=int, default=0, help="documents to use (0: all in the corpus)")
    p.add_argument("--repeat", type=int, default=2, help="resident passes over the documents")
    p.add_argument("--cold-docs", type=int, default=3, help="documents for each cold configuration")
    p.add_argument("--cycles", type=int, default=2, help="sleep/wake cycles")
    p.add_argument("--no-parse", action="store_true", help="memory and lifecycle steps only, no MinerU")
    p.add_argument("--skip-native-sleep", action="store_true")
    p.add_argument("--skip-cold-process", action="store_true")
    p.add_argument("--native-sleep-seconds", type=int, default=3)
    p.add_argument(
        "--inprocess-session",
        action="store_true",
        help="measure ModelSession(engine='llama-cpp') (MinerU's in-process Engine) instead of the resident engine",
    )
    p.add_argument("--session-cycles", type=int, default=2, help="in-process sessions opened and closed in a row")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--cold-one", type=Path, default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# --- readings --------------------------------------------------------------------------------------


def _nvml_lists(device: str, pids: list[int]) -> dict[str, Any] | None:
    """NVML's compute and graphics process lists, for ``pids``, read separately (a Vulkan process may be either)."""
    if device == "cpu":
        return None
    try:
        import pynvml

        from mineru_vram._probe import _nvml_handle, device_index

        handle = _nvml_handle(device_index(device))
        if handle is None:
            return None
        out: dict[str, Any] = {}
        for kind, getter in (
            ("compute", pynvml.nvmlDeviceGetComputeRunningProcesses),
            ("graphics", pynvml.nvmlDeviceGetGraphicsRunningProcesses),
        ):
            try:
                procs = getter(handle)
            except Exception as exc:
                out[kind] = f"{type(exc).__name__}: {exc}"
                continue
            out[kind] = {
                str(p.pid): (None if p.usedGpuMemory is None else round(p.usedGpuMemory / 2**20, 1))
                for p in procs
                if p.pid in pids
            }
        return out
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _device(device: str) -> dict[str, Any] | None:
    if device == "cpu":
        return None
    from mineru_vram._budget import nvml_probe

    info = nvml_probe(device)
    if info is None:
        return None
    return {
        "used_mib": round(info.used_mib, 1),
        "free_mib": round(info.free_mib, 1),
        "processes": {str(p.pid): round(p.used_mib, 1) for p in info.processes},
    }


def _rss_mib(pids: list[int]) -> float | None:
    import psutil

    total = 0.0
    seen = False
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss / 2**20
            seen = True
        except psutil.Error:
            continue
    return round(total, 1) if seen else None


def _reading(engine: Any, device: str, pids: list[int] | None = None) -> dict[str, Any]:
    """The server's memory now: NVML for its processes (both lists), the device, the RSS."""
    if pids is None:
        pids = engine._backend.pids()
    status = engine.status()
    return {
        "state": status.state.value,
        "server_pid": status.pid,
        "engine_memory_mib": status.memory_mib,
        "nvml_lists": _nvml_lists(device, pids),
        "device": _device(device),
        "rss_mib": _rss_mib(pids),
    }


def _report(r: Any) -> dict[str, Any] | None:
    return None if r is None else r.to_dict()


def _summary(times: list[float]) -> dict[str, Any]:
    return {
        "n": len(times),
        "mean_s": statistics.fmean(times) if times else None,
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "max_s": max(times) if times else None,
        "each_s": [round(t, 4) for t in times],
    }


def _memory_lines(log: str) -> list[str]:
    keys = ("buffer size", "memory breakdown", "|   - ", "KV buffer", "ggml_vulkan", "Vulkan0", "CLIP using", "offload")
    return [line.strip() for line in log.splitlines() if any(k in line for k in keys)][:80]


# --- the engine ------------------------------------------------------------------------------------


def _engine(args: argparse.Namespace, **overrides: Any) -> Any:
    import mineru_vram as mv
    from mineru_vram._engine import ResidentEngine

    extra = ["-lv", "4"]  # llama-server logs its buffer sizes at this level
    if args.threads:
        extra += ["--threads", str(args.threads)]
    kwargs: dict[str, Any] = {
        "model_path": args.gguf_dir,
        "device": args.device,
        "extra_args": tuple(extra),
        "start_timeout": 900,
    }
    if args.budget_mib:
        kwargs["budget"] = mv.VramBudget(mib=args.budget_mib, timeout=0)
    kwargs.update(overrides)
    return ResidentEngine("llama-cpp", **kwargs)


def _parse(session: Any, doc: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = session.parse(doc, pages=1, ocr_mode="ocr")
    return time.perf_counter() - t0, result.markdown


def _session(engine: Any, args: argparse.Namespace) -> Any:
    import mineru_vram as mv

    device = "cpu" if args.device == "cpu" else args.device
    return mv.ModelSession("vlm", engine=engine, device=device, models_dir=args.models_dir)


def lifecycle_and_resident(args: argparse.Namespace, docs: list[Path]) -> dict[str, Any]:
    """Start, parse (resident), sleep/wake cycles with the same page before and after, stop."""
    out: dict[str, Any] = {}
    engine = _engine(args)
    t0 = time.perf_counter()
    engine.start()
    out["start_s"] = time.perf_counter() - t0
    plan = engine._backend.plan
    out["plan"] = None if plan is None else {**plan.__dict__}
    steps: dict[str, Any] = {"loaded": _reading(engine, args.device)}
    try:
        session = None if args.no_parse else _session(engine, args).open()
        try:
            before = None
            if session is not None:
                warm_s, before = _parse(session, docs[0])
                times = []
                for _ in range(args.repeat):
                    for doc in docs:
                        times.append(_parse(session, doc)[0])
                out["resident"] = {"warmup_parse_s": warm_s, **_summary(times)}
                steps["loaded_after_parses"] = _reading(engine, args.device)
            cycles = []
            for _ in range(args.cycles):
                pids = engine._backend.pids()
                t0 = time.perf_counter()
                sleep = engine.sleep()
                sleep_s = time.perf_counter() - t0
                asleep = _reading(engine, args.device, pids)
                t0 = time.perf_counter()
                wake = engine.wake()
                wake_s = time.perf_counter() - t0
                cycle = {
                    "sleep_s": sleep_s,
                    "sleep": _report(sleep),
                    "asleep": asleep,
                    "wake_s": wake_s,
                    "wake": _report(wake),
                    "awake": _reading(engine, args.device),
                }
                if session is not None:
                    parse_s, after = _parse(session, docs[0])
                    cycle["parse_after_wake_s"] = parse_s
                    cycle["same_output_after_wake"] = after == before
                cycles.append(cycle)
            steps["cycles"] = cycles
        finally:
            if session is not None:
                session.close()
        log_path = engine.status().log_path
        out["server_log"] = _memory_lines(Path(log_path).read_text(errors="replace")) if log_path else []
        pids = engine._backend.pids()
        t0 = time.perf_counter()
        stop = engine.stop()
        steps["stop_s"] = time.perf_counter() - t0
        steps["stop"] = _report(stop)
        steps["stopped"] = {"nvml_lists": _nvml_lists(args.device, pids), "device": _device(args.device)}
    finally:
        engine.stop()
    out["steps"] = steps
    return out


def native_sleep(args: argparse.Namespace) -> dict[str, Any]:
    """llama-server's own idle sleep on the engine's flags: what it keeps, and what waking costs."""
    import secrets
    import tempfile

    import psutil

    from mineru_vram import _process
    from mineru_vram._engine import http

    engine = _engine(args)
    engine.start()
    server = psutil.Process(engine.status().pid)
    argv, env = server.cmdline(), server.environ()
    engine.stop()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-llama-") as tmp:
        work = Path(tmp)
        key = secrets.token_urlsafe(24)
        (work / "key").write_text(key + "\n")
        (work / "key").chmod(0o600)
        argv[argv.index("--api-key-file") + 1] = str(work / "key")
        port = _process.free_port()
        argv[argv.index("--port") + 1] = str(port)
        argv += ["--sleep-idle-seconds", str(args.native_sleep_seconds)]
        log = work / "server.log"
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        group = _process.spawn(argv, env=env, log_path=log, cwd=work)
        try:
            while True:
                try:
                    if http.request("GET", f"{url}/health", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                if group.poll() is not None or time.perf_counter() - t0 > 900:
                    raise SystemExit(f"llama-server did not start:\n{group.log_tail()}")
                time.sleep(0.05)
            out["start_s"] = time.perf_counter() - t0
            pids = group.pids()
            body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 8}
            t0 = time.perf_counter()
            http.request("POST", f"{url}/v1/chat/completions", api_key=key, body=body, timeout=900)
            out["request_awake_s"] = time.perf_counter() - t0
            out["loaded"] = {"nvml_lists": _nvml_lists(args.device, pids), "rss_mib": _rss_mib(pids)}

            def entered() -> int:
                return log.read_text(errors="replace").count("entering sleeping state")

            deadline = time.monotonic() + args.native_sleep_seconds + 120
            while entered() < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(3.0)  # the log line comes before the frees
            out["asleep"] = {"nvml_lists": _nvml_lists(args.device, pids), "rss_mib": _rss_mib(pids)}
            t0 = time.perf_counter()
            http.request("POST", f"{url}/v1/chat/completions", api_key=key, body=body, timeout=900)
            out["request_that_woke_it_s"] = time.perf_counter() - t0
            out["after_wake"] = {"nvml_lists": _nvml_lists(args.device, pids), "rss_mib": _rss_mib(pids)}
        finally:
            group.terminate(grace=30)
    return out


def cold_one(args: argparse.Namespace) -> None:
    """Child mode: everything a one-shot process does for one document."""
    engine = _engine(args).start()
    try:
        with _session(engine, args) as session:
            _parse(session, args.cold_one)
    finally:
        engine.stop()


def cold_in_process(args: argparse.Namespace, docs: list[Path]) -> dict[str, Any]:
    times = []
    for doc in docs[: args.cold_docs]:
        t0 = time.perf_counter()
        engine = _engine(args).start()
        try:
            with _session(engine, args) as session:
                _parse(session, doc)
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
            *("--gguf-dir", str(args.gguf_dir), "--size", args.size, "--models-dir", str(args.models_dir)),
            *("--device", args.device),
            *(["--threads", str(args.threads)] if args.threads else []),
            *(["--budget-mib", str(args.budget_mib)] if args.budget_mib else []),
            *("--cold-one", str(doc)),
        ]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"cold child failed on {doc}:\n{done.stderr[-4000:]}")
        times.append(elapsed)
    return _summary(times)


# --- MinerU's in-process engine -------------------------------------------------------------------


def _own_reading(device: str) -> dict[str, Any]:
    """This process now: NVML's two process lists for its pid, the device, and RSS."""
    return {
        "nvml_lists": _nvml_lists(device, [os.getpid()]),
        "device": _device(device),
        "rss_mib": _rss_mib([os.getpid()]),
    }


def _inprocess_tree(args: argparse.Namespace, folder: Path) -> Path:
    """A MinerU model tree in ``folder``: the small models and the GGUF pair, linked under MinerU's names."""
    tree = folder / "models"
    tree.mkdir()
    for child in sorted(Path(args.models_dir).iterdir()):
        if child.is_dir() and child.name != "MinerU2.5-Pro-2605-1.2B-GGUF":
            (tree / child.name).symlink_to(child.resolve())
    (tree / "MinerU2.5-Pro-2605-1.2B-GGUF").symlink_to(args.gguf_dir)
    return tree


def inprocess_session(args: argparse.Namespace, docs: list[Path], result: dict[str, Any]) -> dict[str, Any]:
    """Open, parse, close ``ModelSession(backend="vlm", engine="llama-cpp")`` ``--session-cycles`` times."""
    import tempfile

    import mineru_vram as mv

    out: dict[str, Any] = {"baseline": _own_reading(args.device), "cycles": []}
    result["inprocess_session"] = out
    first_pages: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-llama-session-") as tmp:
        tree = _inprocess_tree(args, Path(tmp))
        for _ in range(max(1, args.session_cycles)):
            cycle: dict[str, Any] = {}
            t0 = time.perf_counter()
            session = mv.ModelSession(
                "vlm", engine="llama-cpp", device=args.device, models_dir=tree, ocr_mode="ocr", trust_env=False
            ).open()
            try:
                cycle["open_s"] = time.perf_counter() - t0
                cycle["engine"] = dict(getattr(session.runner, "local_vlm", {}))
                cycle["loaded"] = _own_reading(args.device)
                if docs:
                    times = []
                    for doc in docs:
                        seconds, markdown = _parse(session, doc)
                        times.append(seconds)
                        if doc == docs[0]:
                            first_pages.append(markdown)
                    cycle["parses"] = _summary(times)
                    cycle["after_parses"] = _own_reading(args.device)
            finally:
                t0 = time.perf_counter()
                report = session.close()
                cycle["close_s"] = time.perf_counter() - t0
            cycle["after_close"] = _own_reading(args.device)
            cycle["receipt"] = None if report is None else report.to_dict()
            cycle["receipt_text"] = str(report)
            out["cycles"].append(cycle)
            _keep_partial(args, result)
    out["same_output"] = None if not first_pages else all(page == first_pages[0] for page in first_pages)
    return out


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    from importlib import metadata

    from mineru_vram import vram_snapshot
    from mineru_vram._engine.backends.llama_cpp import llama_server_binary

    info = None if args.device == "cpu" else vram_snapshot(args.device).device_info
    versions = {}
    for dist in ("mineru", "mineru-vram", "mineru-llama-cpp", "mineru-vl-utils"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    binary = llama_server_binary()
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent.parent / 'lib'}:{binary.parent}"}
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env, check=False)
    listed = subprocess.run([str(binary), "--list-devices"], capture_output=True, text=True, env=env, check=False)
    return {
        "device": args.device,
        "gpu": None if info is None else info.name,
        "gpu_total_mib": None if info is None else info.total_mib,
        "driver": None if info is None else info.driver,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "llama_server_version": (done.stdout + done.stderr).strip().splitlines()[-2:],
        "llama_server_devices": (listed.stdout + listed.stderr).strip().splitlines()[-4:],
        "size": args.size,
        "files_mib": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(args.gguf_dir.glob("*.gguf"))},
        "budget_mib": args.budget_mib,
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
    written_s = None
    if args.gguf_dir is None:  # a folder given is used as it is: it may hold the real model
        import tempfile

        folder = Path(tempfile.gettempdir()) / f"mineru-vram-gguf-{args.size}" / "MinerU2.5-Pro-2605-1.2B-GGUF"
        t0 = time.perf_counter()
        args.gguf_dir = testing.write_random_vlm_gguf(folder, size=args.size)
        written_s = time.perf_counter() - t0
    args.gguf_dir = Path(args.gguf_dir).resolve()
    if not args.no_parse:
        from mineru_vram.testing._cache import random_models

        args.models_dir = random_models(args.models_dir).resolve()  # written once into a cache if missing
    if args.cold_one is not None:
        cold_one(args)
        return 0
    docs: list[Path] = []
    if not args.no_parse:
        if args.corpus is None:
            raise SystemExit("--corpus is needed unless --no-parse")
        docs = sorted(p for p in args.corpus.glob("*.pdf") if p.is_file())
        docs = docs[: args.docs] if args.docs > 0 else docs
        if not docs:
            raise SystemExit(f"no PDFs in {args.corpus}")
    print(f"bench_llama_cpp: {len(docs)} documents on {args.device}, size {args.size}", file=sys.stderr)
    result: dict[str, Any] = {
        "environment": _environment(args),
        "gguf_write_s": written_s,
        "documents": [d.name for d in docs],
        "baseline": _device(args.device),
    }
    if args.inprocess_session:
        if args.models_dir is None:  # --no-parse skipped it above; the session loads the small models anyway
            from mineru_vram.testing._cache import random_models

            args.models_dir = random_models(None).resolve()
        result["mode"] = "inprocess_session"
        inprocess_session(args, docs, result)
        result["after_all"] = _device(args.device)
        text = json.dumps(result, indent=2, default=str)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n", encoding="utf-8")
        return 0
    result.update(lifecycle_and_resident(args, docs))
    _keep_partial(args, result)
    if not args.skip_native_sleep:
        print("bench_llama_cpp: llama-server's own sleep next", file=sys.stderr)
        result["native_sleep"] = native_sleep(args)
        _keep_partial(args, result)
    if docs:
        print("bench_llama_cpp: cold starts next", file=sys.stderr)
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
    result["after_all"] = _device(args.device)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
