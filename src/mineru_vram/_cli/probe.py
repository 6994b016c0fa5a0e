"""``mineru-vram probe``: GPUs, who holds their memory, the CUDA-context floor, MinerU and its models."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from typing import Any, TextIO

from .common import EXIT_OK, EXIT_USAGE, err


def _torch_info(device: str) -> dict[str, Any]:
    from mineru_vram._config import patched_environ
    from mineru_vram._probe import vram_snapshot

    try:
        import torch
    except ImportError as exc:
        return {"installed": False, "error": str(exc)}
    # NVML-based availability check: asks the driver how many GPUs there are without
    # initialising CUDA in this process (torch's own check would).
    with patched_environ({"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}):
        available = bool(torch.cuda.is_available())
        count = int(torch.cuda.device_count()) if available else 0
    snap = vram_snapshot(device) if device.startswith("cuda") and available else None
    return {
        "installed": True,
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": available,
        "device_count": count,
        "cuda_initialized": bool(snap.cuda_initialized) if snap else False,
        "allocated_mib": snap.torch_allocated_mib if snap else None,
        "reserved_mib": snap.torch_reserved_mib if snap else None,
    }


def probe_report(*, device: str = "cuda:0", floor: bool = True) -> dict[str, Any]:
    """Everything ``mineru-vram probe`` prints, as a dict (JSON-serialisable)."""
    from mineru_vram._adapter import mineru_paths, mineru_version
    from mineru_vram._config import env_settings
    from mineru_vram._probe import (
        _device_memory,
        _nvml,
        _nvml_error,
        measure_context_floor,
        nvml_device_count,
        resolve_device,
    )
    from mineru_vram._version import __version__
    from mineru_vram.testing._cache import default_models_dir

    gpus: list[dict[str, Any]] = []
    count = nvml_device_count()
    nvml = _nvml()
    cuda_driver = None
    if nvml is not None:
        with contextlib.suppress(Exception):
            raw = int(nvml.nvmlSystemGetCudaDriverVersion())
            cuda_driver = f"{raw // 1000}.{raw % 1000 // 10}"
    for index in range(count):
        try:
            info = _device_memory(nvml.nvmlDeviceGetHandleByIndex(index), index) if nvml is not None else None
        except Exception:
            info = None
        if info is None:
            gpus.append({"index": index, "error": "NVML could not read the device"})
            continue
        gpus.append(
            {
                "index": info.index,
                "name": info.name,
                "driver": info.driver,
                "total_mib": info.total_mib,
                "used_mib": info.used_mib,
                "free_mib": info.free_mib,
                "processes": [{"pid": p.pid, "name": p.name, "used_mib": p.used_mib} for p in info.processes],
            }
        )
    dev = resolve_device(device)
    floor_mib = None
    floor_note = ""
    if not count:
        floor_note = "not measured: no GPU"
    elif not floor:
        floor_note = "not measured (--no-floor)"
    elif not dev.startswith("cuda"):
        floor_note = "not measured: cpu device"
    else:
        floor_mib = measure_context_floor(dev)
        floor_note = "measured now in a child process" if floor_mib is not None else "the measurement failed"
    try:
        env = {k: str(v) for k, v in env_settings().items()}
        env_error = None
    except Exception as exc:
        env, env_error = {}, str(exc)
    random_cache = default_models_dir()
    return {
        "mineru_vram": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu_count": count,
        "nvml_error": _nvml_error() if count == 0 else None,
        "cuda_driver": cuda_driver,
        "gpus": gpus,
        "this_process": {"pid": os.getpid(), "torch": _torch_info(dev)},
        "context_floor": {"device": dev, "mib": floor_mib, "note": floor_note},
        "mineru": {"version": mineru_version(), **mineru_paths()},
        "settings": {"env": env, "env_error": env_error},
        "random_models_cache": {"path": str(random_cache), "exists": random_cache.is_dir()},
    }


def _render_probe(r: dict[str, Any], w: TextIO) -> None:
    def mib(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f} MiB"

    print(f"mineru-vram {r['mineru_vram']}  (python {r['python']}, {r['platform']})", file=w)
    print("", file=w)
    if not r["gpu_count"]:
        print(f"GPUs: none. No GPU visible to NVML ({r['nvml_error'] or 'no device'}).", file=w)
        print("      Sessions run on the CPU; VRAM figures are not available.", file=w)
    else:
        driver = r["gpus"][0].get("driver", "") if r["gpus"] else ""
        print(f"GPUs: {r['gpu_count']} (driver {driver}, CUDA driver API {r['cuda_driver'] or 'n/a'})", file=w)
        for g in r["gpus"]:
            if "error" in g:
                print(f"  [{g['index']}] {g['error']}", file=w)
                continue
            print(
                f"  [{g['index']}] {g['name']}: {mib(g['used_mib'])} used of {mib(g['total_mib'])}, "
                f"{mib(g['free_mib'])} free",
                file=w,
            )
            if not g["processes"]:
                print("      no process holds memory on it (or NVML cannot see them from here)", file=w)
            for p in sorted(g["processes"], key=lambda p: -p["used_mib"]):
                print(f"      pid {p['pid']:>7}  {mib(p['used_mib']):>12}  {p['name']}", file=w)
    print("", file=w)
    t = r["this_process"]["torch"]
    if not t.get("installed"):
        print(f"torch: not importable ({t.get('error')})", file=w)
    else:
        print(
            f"torch {t['version']} (CUDA build {t['cuda_build'] or 'none'}): CUDA available: "
            f"{'yes, ' + str(t['device_count']) + ' device(s)' if t['cuda_available'] else 'no'}",
            file=w,
        )
        if t["cuda_initialized"]:
            print(
                f"  this process (pid {r['this_process']['pid']}): allocated {mib(t['allocated_mib'])}, "
                f"reserved {mib(t['reserved_mib'])}",
                file=w,
            )
        else:
            print(
                f"  this process (pid {r['this_process']['pid']}): torch allocator empty, CUDA not initialised "
                "(probing never creates a context)",
                file=w,
            )
    floor = r["context_floor"]
    value = f"{floor['mib']:.0f} MiB on {floor['device']}, " if floor["mib"] is not None else ""
    print(f"CUDA-context floor: {value}{floor['note']}", file=w)
    if floor["mib"] is not None:
        print("  (what any process that uses CUDA holds; in-process release cannot go below it)", file=w)
    print("", file=w)
    m = r["mineru"]
    print(f"MinerU {m['version'] or 'not installed'}", file=w)
    print(f"  home {m['home']}; config {m['config_file']} ({'found' if m['config_exists'] else 'absent'})", file=w)
    if m["config_error"]:
        print(f"  config unreadable: {m['config_error']}", file=w)
    state = "" if m["models_dir_exists"] else " (absent)"
    print(f"  models {m['models_dir']}{state}; source {m['model_source']}", file=w)
    if not m["repos"]:
        print("  no MinerU model repository there (MinerU downloads on first use unless source is local)", file=w)
    for repo in m["repos"]:
        status = "complete" if repo["complete"] else "incomplete (no .mineru_complete marker)"
        print(f"    {repo['name']}: {mib(repo['mib'])}, {status}", file=w)
    rc = r["random_models_cache"]
    print(f"  random-weight models (demo): {rc['path']} ({'present' if rc['exists'] else 'absent'})", file=w)
    s = r["settings"]
    if s["env_error"]:
        print(f"MINERU_VRAM_* settings: invalid: {s['env_error']}", file=w)
    elif s["env"]:
        print("MINERU_VRAM_* settings: " + ", ".join(f"{k}={v}" for k, v in s["env"].items()), file=w)
    else:
        print("MINERU_VRAM_* settings: none set", file=w)


def cmd_probe(args: argparse.Namespace) -> int:
    from mineru_vram._exceptions import ConfigurationError

    try:
        report = probe_report(device=args.device, floor=args.floor)
    except ConfigurationError as exc:
        err(f"mineru-vram probe: {exc}")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _render_probe(report, sys.stdout)
    return EXIT_OK
