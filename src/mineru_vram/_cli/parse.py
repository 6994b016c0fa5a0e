"""``mineru-vram parse``: documents to Markdown, JSON and images in one session, then the receipt."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import EXIT_FAILED, EXIT_LEAK, EXIT_OK, EXIT_USAGE, PROGRESS_DESC, err, mineru_quiet


def _expand_inputs(items: Sequence[str]) -> list[str]:
    """Files stay as given (validation names them if they are bad); folders give their *.pdf."""
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".pdf")
            if not found:
                err(f"mineru-vram parse: warning: no *.pdf files in folder {item}")
            out.extend(str(p) for p in found)
        else:
            out.append(item)
    return out


def _make_engine(args: argparse.Namespace) -> Any:
    from mineru_vram._engine import ResidentEngine
    from mineru_vram._exceptions import ConfigurationError

    if args.server_url:
        return ResidentEngine.attach(args.server_url, api_key=_attach_key(args))
    if args.engine:
        if not args.model_path:
            raise ConfigurationError(f"--engine {args.engine} needs --model-path (the VLM model directory)")
        from mineru_vram._budget import VramBudget
        from mineru_vram._engine.backends import BACKENDS

        sizing: dict[str, Any] = {}
        if args.vram_budget_gib is not None:
            # SGLang and vLLM size a pool by a fraction; the others take the budget itself (no wait, as there).
            if BACKENDS[args.engine].traits.pool_fraction:
                sizing["vram_budget_gib"] = args.vram_budget_gib
            else:
                sizing["budget"] = VramBudget(mib=args.vram_budget_gib * 1024, timeout=0.0)
        return ResidentEngine(args.engine, model_path=args.model_path, device=args.device, **sizing).start()
    raise ConfigurationError(
        f"--backend {args.backend} parses through a VLM engine: pass --engine sglang|vllm|transformers|llama-cpp with "
        "--model-path, or --server-url of a running OpenAI-compatible server"
    )


def _attach_key(args: argparse.Namespace) -> str | None:
    """The attached server's key: ``--api-key-file``, else ``MINERU_VRAM_API_KEY``, never argv if avoidable.

    Raises:
        ConfigurationError: the file cannot be read or is empty, or two sources are given.
    """
    from mineru_vram._config import getenv
    from mineru_vram._exceptions import ConfigurationError

    if args.api_key is not None:
        err(
            "mineru-vram: warning: --api-key is deprecated and will be removed: a key on the command line "
            "is readable by every local user (ps, /proc). Use --api-key-file FILE or MINERU_VRAM_API_KEY."
        )
        if args.api_key_file:
            raise ConfigurationError("pass --api-key-file or --api-key, not both")
        return str(args.api_key)
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"--api-key-file {path}: cannot read it: {exc}", path=str(path)) from None
        if not key or "\n" in key:
            raise ConfigurationError(f"--api-key-file {path}: expected the key alone on one line", path=str(path))
        return key
    return getenv("MINERU_VRAM_API_KEY") or None


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    # disable=None: tqdm draws only on a terminal, so logs and pipes get the plain lines.
    return tqdm(total=total, unit="doc", desc=PROGRESS_DESC, file=sys.stderr, disable=None if enabled else True)


def cmd_parse(args: argparse.Namespace) -> int:
    files = _expand_inputs(args.files)
    if not files:
        err("mineru-vram parse: no documents to parse")
        return EXIT_USAGE
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err(f"mineru-vram parse: cannot create the output folder {out}: {exc}")
        return EXIT_USAGE
    try:
        _page_numbers(args.pages)
    except ValueError as exc:  # ConfigurationError: a malformed --pages
        err(f"mineru-vram parse: --pages: {exc}")
        return EXIT_USAGE
    t0 = time.perf_counter()
    with mineru_quiet(args.verbose):
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
            err(f"mineru-vram parse: the session failed: {exc}")
            return exc.status
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
        err(f"mineru-vram parse: {len(failures)} document(s) failed:")
        for path, error in failures:
            err(f"  {path}: {type(error).__name__}: {error}")
        return EXIT_FAILED
    if strict and report is not None and not report.ok:
        err(f"mineru-vram parse: memory not fully released: {'; '.join(report.problems())}")
        return EXIT_LEAK
    return EXIT_OK


class _SessionFailed(Exception):
    """The session itself failed (open or release), not one document. ``status`` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _new_session(args: argparse.Namespace) -> tuple[Any, Any] | int:
    """``(session, engine)``, or the exit status when they cannot be made."""
    from mineru_vram._exceptions import ConfigurationError, MineruVramError
    from mineru_vram._session import ModelSession

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
        if args.timeout is not None and session.settings.isolation != "process":
            raise ConfigurationError(
                "--timeout needs --isolation process (a parse running in this process cannot be interrupted safely)"
            )
    except ConfigurationError as exc:
        err(f"mineru-vram parse: {exc}")
        if engine is not None:
            engine.stop()
        return EXIT_USAGE
    except MineruVramError as exc:  # the engine did not start
        err(f"mineru-vram parse: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    return session, engine


def _parse_all(session: Any, files: Sequence[str], out: Path, args: argparse.Namespace) -> tuple[int, list[Any]]:
    """Parse and save each file; returns ``(parsed, [(file, error), ...])``.

    Raises:
        _SessionFailed: the session could not open, or its release failed.
    """
    from mineru_vram._exceptions import ConfigurationError, MineruVramError, SessionStateError

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
    except ConfigurationError as exc:  # a setting only the open could judge (a device NVML does not see)
        raise _SessionFailed(f"{type(exc).__name__}: {exc}", EXIT_USAGE) from exc
    except MineruVramError as exc:  # opening failed (models, worker, admission), or release raised
        raise _SessionFailed(f"{type(exc).__name__}: {exc}", EXIT_FAILED) from exc
    finally:
        bar.close()
    return done, failures


def _page_numbers(spec: str | None) -> list[int] | None:
    """``--pages`` as page numbers, checked once for the whole batch."""
    from mineru_vram._documents import parse_pages

    if spec is None:
        return None
    # Validated against no document yet: each document keeps the pages it has (below).
    return [int(p) for p in parse_pages(spec, sys.maxsize).split(",")]


def _parse_one(session: Any, path: str, name: str, pages: list[int] | None, args: argparse.Namespace) -> Any:
    """Parse one file; ``--pages 1-5`` takes the pages a shorter document has, as MinerU's own CLI does."""
    from mineru_vram._exceptions import ConfigurationError

    # No --timeout: the session's default bound (isolated), which only a hung worker reaches.
    timeout = "auto" if args.timeout is None else args.timeout
    if pages is None:
        return session.parse(path, name=name, timeout=timeout)
    doc = session.load(path, name=name)
    # A document pdfium could not count (page_count None) keeps every page asked for: MinerU decides.
    wanted = pages if doc.page_count is None else [p for p in pages if p <= doc.page_count]
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
