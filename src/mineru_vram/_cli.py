"""The ``mineru-vram`` command line (also ``python -m mineru_vram``).

Subcommands: ``parse`` (documents to Markdown, JSON and images, with the release
receipt), ``probe`` (GPUs, who holds their memory, the CUDA-context floor, MinerU
and its models), ``demo`` (offline, random-weight models), ``timeline`` (memory
over time while a command runs: PNG + CSV) and ``worker`` (a task queue's worker).

Importing this module imports nothing heavy: each command imports what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["EXIT_FAILED", "EXIT_LEAK", "EXIT_OK", "EXIT_USAGE", "main", "probe_report"]

EXIT_OK = 0
EXIT_FAILED = 1  # a document failed (each is named), or the session could not open
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_LEAK = 3  # --strict, and the release receipt is not clean
EXIT_INTERRUPTED = 130

_BACKENDS = ("pipeline", "flash", "vlm", "hybrid")

_EXAMPLES = """\
examples:
  mineru-vram parse paper.pdf scans/ -o out/                  pipeline backend, first GPU (else CPU)
  mineru-vram parse paper.pdf -o out/ --backend flash         text PDFs without models
  mineru-vram parse a.pdf b.pdf -o out/ --isolation process   models in a worker process
  mineru-vram probe                                           GPUs, processes, CUDA floor, MinerU
  mineru-vram demo                                            offline demo, CPU is fine
  mineru-vram timeline -o tl/ -- mineru-vram parse a.pdf -o out/
  mineru-vram worker tasks.db --until-idle                    process a task queue

exit status: 0 ok; 1 a document failed (each is named) or the session could not start;
2 bad arguments or configuration; 3 --strict and memory was not fully released.
documentation: docs/ in the mineru-vram repository (docs/cli.md for this command)
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (MinerU's included)")

    parser = argparse.ArgumentParser(
        prog="mineru-vram",
        description="GPU memory as a managed resource for MinerU: parse documents and get every byte back.",
        epilog=_EXAMPLES,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"mineru-vram {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "parse",
        parents=[common],
        formatter_class=_Formatter,
        help="parse PDFs to Markdown, JSON and images; print the release receipt",
        description=(
            "Parse PDFs in one session: load MinerU's models once, parse every document, release,\n"
            "and print the receipt. Each document goes to OUT/<stem>/: <stem>.md, <stem>_content_list.json,\n"
            "<stem>_middle.json and images/. A document that fails is named and the others still run;\n"
            "the exit status is then 1."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="PDF files, or folders (their *.pdf files)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (created if missing)")
    p.add_argument(
        "--backend",
        choices=_BACKENDS,
        default="pipeline",
        help="pipeline (MinerU's models), flash (no models, text PDFs), vlm or hybrid (a VLM engine); "
        "default %(default)s",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: MINERU_VRAM_DEVICE, else first GPU, else cpu)")
    p.add_argument("--isolation", choices=("none", "process"), help="process: models live in a worker process")
    p.add_argument("--pages", metavar="PAGES", help="1-based pages of each document, e.g. 1-5 or 1,3,7-9")
    p.add_argument("--ocr-mode", choices=("auto", "txt", "ocr"), default="auto", help="default %(default)s")
    p.add_argument("--models-dir", metavar="DIR", help="a MinerU model tree (default: MinerU's own configuration)")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds per document (needs --isolation process)")
    p.add_argument("--strict", action="store_true", help="exit 3 when memory was not fully released")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    vlm = p.add_argument_group("VLM engine (for --backend vlm or hybrid)")
    vlm.add_argument("--engine", choices=("sglang", "vllm", "transformers"), help="start this engine for the run")
    vlm.add_argument("--model-path", metavar="DIR", help="the VLM model directory (--engine)")
    vlm.add_argument("--vram-budget-gib", type=float, metavar="GIB", help="the engine's GPU memory budget")
    vlm.add_argument("--server-url", metavar="URL", help="use a running OpenAI-compatible VLM server instead")
    vlm.add_argument("--api-key", help="the server's API key (--server-url)")

    p = sub.add_parser(
        "probe",
        parents=[common],
        formatter_class=_Formatter,
        help="GPUs, per-process memory, torch allocator, CUDA-context floor, MinerU and its models",
        description=(
            "Report what this machine has and who holds GPU memory: each GPU by NVML (driver, used and\n"
            "free memory, every process's share), this process's torch allocator, the CUDA-context floor\n"
            "measured now in a child process, MinerU's version, configuration and model folders.\n"
            "Works without a GPU and says so."
        ),
    )
    p.add_argument("--device", default="cuda:0", help="where to measure the CUDA-context floor (default cuda:0)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the CUDA-context measurement")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=_Formatter,
        help="offline demo: random models, a generated PDF, the release receipt",
        description="Write random-weight MinerU models, parse a generated 2-page PDF, print the receipt.",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: first GPU, else cpu)")
    p.add_argument("--models-dir", default=None, help="where to write/reuse the random model tree")
    p.add_argument("-o", "--out", default=None, help="also save the result to this folder")
    p.add_argument("--isolation", choices=("none", "process"), default="none")

    p = sub.add_parser(
        "timeline",
        parents=[common],
        formatter_class=_Formatter,
        help="run a command and record GPU memory over time: a PNG plot and CSVs",
        description=(
            "Run COMMAND and sample memory while it runs (50 Hz by default): the whole device and the\n"
            "command's processes (its descendants too, such as isolated workers) by NVML, and their host\n"
            "RSS. mineru-vram sessions inside the command mark their phases (load, parse per document,\n"
            "release); the end of the command is marked 'exit'. Writes OUT/timeline.png,\n"
            "OUT/timeline.csv (one row per sample), OUT/phases.csv and OUT/events.jsonl.\n"
            "Without a GPU, host RSS is recorded and the plot says so. Exits with COMMAND's status."
        ),
        epilog="example:\n  mineru-vram timeline -o tl/ -- mineru-vram parse paper.pdf -o out/ --backend flash",
    )
    p.add_argument("-o", "--out", default="mineru-vram-timeline", metavar="DIR", help="default %(default)s")
    p.add_argument("--device", help="the GPU to sample (default: first GPU)")
    p.add_argument("--hz", type=float, default=50.0, help="samples per second (default %(default)s)")
    p.add_argument("--tail", type=float, default=1.0, metavar="S", help="keep sampling after the exit (default 1 s)")
    p.add_argument("--title", help="the plot's title (default: the command)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND...", help="the command to run")

    # Help listing only: main() hands `worker ...` to the queue's own parser before argparse runs.
    sub.add_parser(
        "worker",
        help="run a task queue's worker loop (mineru-vram worker tasks.db --help)",
        add_help=False,
    )
    return parser


# --- shared helpers ---------------------------------------------------------------------------


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        # pypdfium2 warns "Explicitly closing <PdfBitmap ...>" for every page MinerU renders:
        # noise for someone reading a progress bar. -v shows it again.
        logging.getLogger("pypdfium2").setLevel(logging.ERROR)


@contextlib.contextmanager
def _mineru_quiet(verbose: int) -> Iterator[None]:
    """MinerU logs every page at INFO through loguru; a command line shows warnings only (-v: all)."""
    from ._config import patched_environ

    if verbose:
        yield
        return
    # MinerU reads MINERU_LOG_LEVEL (config field log.level) and sets LOGURU_LEVEL itself.
    # TQDM_DISABLE turns off MinerU's per-stage progress bars; ours passes `disable` explicitly,
    # which tqdm lets override the variable.
    quiet = {"MINERU_LOG_LEVEL": "warning", "LOGURU_LEVEL": "WARNING", "TQDM_DISABLE": "1"}
    with patched_environ(quiet):
        yield


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- parse ------------------------------------------------------------------------------------


def _expand_inputs(items: Sequence[str]) -> list[str]:
    """Files stay as given (validation names them if they are bad); folders give their *.pdf."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".pdf")
            if not found:
                _err(f"mineru-vram parse: warning: no *.pdf files in folder {item}")
            out.extend(str(p) for p in found)
        else:
            out.append(item)
    return out


def _make_engine(args: argparse.Namespace) -> Any:
    from ._engine import ResidentEngine
    from ._exceptions import ConfigurationError

    if args.server_url:
        return ResidentEngine.attach(args.server_url, api_key=args.api_key)
    if args.engine:
        if not args.model_path:
            raise ConfigurationError(f"--engine {args.engine} needs --model-path (the VLM model directory)")
        return ResidentEngine(
            args.engine,
            model_path=args.model_path,
            device=args.device,
            vram_budget_gib=args.vram_budget_gib,
        ).start()
    raise ConfigurationError(
        f"--backend {args.backend} parses through a VLM engine: pass --engine sglang|vllm|transformers with "
        "--model-path, or --server-url of a running OpenAI-compatible server"
    )


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # disable=None: tqdm draws only on a terminal, so logs and pipes get the plain lines.
    return tqdm(total=total, unit="doc", desc="mineru-vram", file=sys.stderr, disable=None if enabled else True)


def _cmd_parse(args: argparse.Namespace) -> int:
    files = _expand_inputs(args.files)
    if not files:
        _err("mineru-vram parse: no documents to parse")
        return EXIT_USAGE
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _err(f"mineru-vram parse: cannot create the output folder {out}: {exc}")
        return EXIT_USAGE
    try:
        _page_numbers(args.pages)
    except ValueError as exc:  # ConfigurationError: a malformed --pages
        _err(f"mineru-vram parse: --pages: {exc}")
        return EXIT_USAGE
    t0 = time.perf_counter()
    with _mineru_quiet(args.verbose):
        opened = _new_session(args)
        if isinstance(opened, int):
            return opened
        session, engine = opened
        print(
            f"mineru-vram parse: {len(files)} document(s), backend {session.backend}, device {session.device}, "
            f"isolation {session.settings.isolation} -> {out}",
            flush=True,
        )
        try:
            done, failures = _parse_all(session, files, out, args)
        except _SessionFailed as exc:
            _err(f"mineru-vram parse: the session failed: {exc}")
            return EXIT_FAILED
        finally:
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.stop()
    report = session.release_report
    print(f"release receipt: {report}", flush=True)
    print(
        f"mineru-vram parse: {done} parsed, {len(failures)} failed in {time.perf_counter() - t0:.1f}s; output in {out}",
        flush=True,
    )
    return _parse_status(failures, report, strict=args.strict)


def _parse_status(failures: Sequence[tuple[str, BaseException]], report: Any, *, strict: bool) -> int:
    if failures:
        _err(f"mineru-vram parse: {len(failures)} document(s) failed:")
        for path, error in failures:
            _err(f"  {path}: {type(error).__name__}: {error}")
        return EXIT_FAILED
    if strict and report is not None and not report.ok:
        _err(f"mineru-vram parse: memory not fully released: {'; '.join(report.problems())}")
        return EXIT_LEAK
    return EXIT_OK


class _SessionFailed(Exception):
    """The session itself failed (open or release), not one document."""


def _new_session(args: argparse.Namespace) -> tuple[Any, Any] | int:
    """``(session, engine)``, or the exit status when they cannot be made."""
    from ._exceptions import ConfigurationError, MineruVramError
    from ._session import ModelSession

    engine = None
    try:
        if args.backend in ("vlm", "hybrid"):
            engine = _make_engine(args)
        session = ModelSession(
            args.backend,
            device=args.device,
            models_dir=args.models_dir,
            isolation=args.isolation,
            engine=engine,
            ocr_mode=args.ocr_mode,
        )
    except ConfigurationError as exc:
        _err(f"mineru-vram parse: {exc}")
        if engine is not None:
            engine.stop()
        return EXIT_USAGE
    except MineruVramError as exc:  # the engine did not start
        _err(f"mineru-vram parse: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    return session, engine


def _parse_all(session: Any, files: Sequence[str], out: Path, args: argparse.Namespace) -> tuple[int, list[Any]]:
    """Parse and save each file; returns ``(parsed, [(file, error), ...])``.

    Raises:
        _SessionFailed: the session could not open, or its release failed.
    """
    from ._exceptions import MineruVramError, SessionStateError

    failures: list[tuple[str, BaseException]] = []
    done = 0
    stems: set[str] = set()
    pages = _page_numbers(args.pages)
    bar = _progress(len(files), args.progress)
    try:
        with session as s:
            for path in files:
                stem = _unique_stem(Path(path).stem or "document", stems)
                name = path if stem == Path(path).stem else f"{stem}.pdf"
                try:
                    result = _parse_one(s, path, name, pages, args)
                    target = result.save(out / stem)
                except SessionStateError:
                    raise
                except (MineruVramError, OSError, ValueError) as exc:
                    failures.append((path, exc))
                    bar.write(f"FAILED {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
                else:
                    done += 1
                    n = result.page_count
                    bar.write(
                        f"ok     {path} -> {target}/ ({n} page{'' if n == 1 else 's'}, {result.seconds:.1f}s)",
                        file=sys.stdout,
                    )
                bar.update(1)
    except MineruVramError as exc:  # opening failed (models, worker, admission), or release raised
        raise _SessionFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        bar.close()
    return done, failures


def _page_numbers(spec: str | None) -> list[int] | None:
    """``--pages`` as page numbers, checked once for the whole batch."""
    from ._documents import parse_pages

    if spec is None:
        return None
    # Validated against no document yet: each document keeps the pages it has (below).
    return [int(p) for p in parse_pages(spec, sys.maxsize).split(",")]


def _parse_one(session: Any, path: str, name: str, pages: list[int] | None, args: argparse.Namespace) -> Any:
    """Parse one file; ``--pages 1-5`` takes the pages a shorter document has, as MinerU's own CLI does."""
    from ._exceptions import ConfigurationError

    # No --timeout: the session's default bound (isolated), which only a hung worker reaches.
    timeout = "auto" if args.timeout is None else args.timeout
    if pages is None:
        return session.parse(path, name=name, timeout=timeout)
    doc = session.load(path, name=name)
    wanted = [p for p in pages if p <= doc.page_count]
    if not wanted:
        raise ConfigurationError(
            f"{name}: --pages {args.pages} selects none of its {doc.page_count} page(s)", document=name
        )
    return session.parse(doc.data, pages=wanted, name=name, timeout=timeout)


def _unique_stem(stem: str, used: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}"
    used.add(candidate)
    return candidate


# --- probe ------------------------------------------------------------------------------------

# MinerU 4.0.12's model repositories under model.base_dir (mineru/model/registry.py), and the
# marker its downloader writes into a complete one (mineru/model/download.py).
_MINERU_REPOS = (
    "MinerU-4_models_torch",
    "MinerU-4_models_onnx",
    "MinerU2.5-Pro-2605-1.2B",
    "MinerU2.5-Pro-2605-1.2B-GGUF",
)
_COMPLETE_MARKER = ".mineru_complete"


def _mineru_paths() -> dict[str, Any]:
    """Where MinerU would look, worked out without importing it (its import reads and writes config).

    Precedence as MinerU 4.0.12's config.py: ``MINERU_MODEL_BASE_DIR`` > the config file's
    ``model.base_dir`` > ``$MINERU_HOME/models`` (``~/.mineru``).
    """
    home = Path(os.environ.get("MINERU_HOME") or "~/.mineru").expanduser()
    config_file = Path(os.environ.get("MINERU_CONFIG") or home / "config.yaml").expanduser()
    base_dir: str | None = os.environ.get("MINERU_MODEL_BASE_DIR") or None
    source = os.environ.get("MINERU_MODEL_SOURCE") or None
    config_error = None
    if config_file.is_file():
        try:
            import yaml

            data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            model = data.get("model") or {} if isinstance(data, dict) else {}
            base_dir = base_dir or model.get("base_dir")
            source = source or model.get("source")
        except Exception as exc:  # unreadable YAML is worth reporting, not crashing over
            config_error = f"{type(exc).__name__}: {exc}"
    models = Path(base_dir).expanduser() if base_dir else home / "models"
    repos = []
    for name in _MINERU_REPOS:
        root = models / name
        if not root.is_dir():
            continue
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        repos.append({"name": name, "path": str(root), "complete": _has_marker(root), "mib": size / 2**20})
    return {
        "home": str(home),
        "config_file": str(config_file),
        "config_exists": config_file.is_file(),
        "config_error": config_error,
        "models_dir": str(models),
        "models_dir_exists": models.is_dir(),
        "model_source": source or "auto",
        "repos": repos,
    }


def _has_marker(root: Path) -> bool:
    if (root / _COMPLETE_MARKER).is_file():
        return True
    return any(p.name == _COMPLETE_MARKER for p in root.rglob(_COMPLETE_MARKER))


def _torch_info(device: str) -> dict[str, Any]:
    from ._config import patched_environ
    from ._probe import vram_snapshot

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
    from ._adapter import mineru_version
    from ._config import env_settings
    from ._demo import default_cache_dir
    from ._probe import _device_memory, _nvml, _nvml_error, measure_context_floor, nvml_device_count, resolve_device
    from ._version import __version__

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
    random_cache = default_cache_dir()
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
        "mineru": {"version": mineru_version(), **_mineru_paths()},
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


def _cmd_probe(args: argparse.Namespace) -> int:
    from ._exceptions import ConfigurationError

    try:
        report = probe_report(device=args.device, floor=args.floor)
    except ConfigurationError as exc:
        _err(f"mineru-vram probe: {exc}")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _render_probe(report, sys.stdout)
    return EXIT_OK


# --- timeline ---------------------------------------------------------------------------------


def _cmd_timeline(args: argparse.Namespace) -> int:
    from ._events import ENV_EVENTS_FILE
    from ._exceptions import ConfigurationError
    from ._timeline import Timeline

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        _err("mineru-vram timeline: no command given; usage: mineru-vram timeline [-o DIR] -- COMMAND...")
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    events.unlink(missing_ok=True)
    title = args.title or " ".join([Path(cmd[0]).name, *cmd[1:]])
    try:
        tl = Timeline(device=args.device, hz=args.hz, pids=[], events_file=events, listen=False, title=title[:120])
    except ConfigurationError as exc:
        _err(f"mineru-vram timeline: {exc}")
        return EXIT_USAGE
    # The command alone gets the variable: its sessions append their phases to the file.
    env = {**os.environ, ENV_EVENTS_FILE: str(events.resolve())}
    try:
        proc = subprocess.Popen(cmd, env=env)
    except OSError as exc:
        _err(f"mineru-vram timeline: cannot run {cmd[0]!r}: {exc}")
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
        _err(f"mineru-vram timeline: no PNG: {exc}")
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


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "worker":
        from ._queue import run_worker_cli

        return run_worker_cli(args_list[1:])
    args = _build_parser().parse_args(args_list)
    _setup_logging(args.verbose)
    commands = {"parse": _cmd_parse, "probe": _cmd_probe, "timeline": _cmd_timeline, "demo": _cmd_demo}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        _err("mineru-vram: interrupted")
        return EXIT_INTERRUPTED


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    with _mineru_quiet(args.verbose):
        return run_demo(device=args.device, models_dir=args.models_dir, out=args.out, isolation=args.isolation)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
