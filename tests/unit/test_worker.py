"""The worker package's parts that need no worker: messages, payloads, errors, policy, device checks."""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import mineru_vram as mv
from mineru_vram._config import resolve_backend
from mineru_vram._documents import Document
from mineru_vram._inprocess import ParseOptions, SessionSettings
from mineru_vram._probe import DeviceMemory, ProcessMemory
from mineru_vram._worker import device, handle, protocol, runner


def test_small_payloads_go_inline_and_large_ones_through_a_private_file_that_is_removed(tmp_path: Path) -> None:
    small = {"markdown": "short"}
    ref = protocol.pack(small, tmp_path, "small", limit=1024)
    assert ref.route == "inline"
    assert protocol.unpack(ref) == small

    big = {"images": {"a.png": b"\x89PNG" + bytes(4096)}}
    ref = protocol.pack(big, tmp_path, "big", limit=1024)
    assert ref.route == "file"
    assert ref.path is not None
    assert Path(ref.path).parent == tmp_path
    assert Path(ref.path).stat().st_mode & 0o777 == 0o600
    assert protocol.unpack(ref) == big
    assert list(tmp_path.iterdir()) == []


def test_a_payload_file_swapped_for_a_link_is_refused(tmp_path: Path) -> None:
    ref = protocol.pack({"x": bytes(4096)}, tmp_path, "big", limit=0)
    assert ref.path is not None
    elsewhere = tmp_path / "elsewhere.pickle"
    Path(ref.path).rename(elsewhere)
    Path(ref.path).symlink_to(elsewhere)
    with pytest.raises(mv.InsecurePathError):
        protocol.unpack(ref)


@pytest.mark.parametrize("limit", [0, 1 << 20], ids=["file", "inline"])
def test_documents_round_trip_by_either_route(tmp_path: Path, limit: int) -> None:
    doc = Document(name="paper.pdf", data=b"%PDF-1.4 body %%EOF", page_count=3, path=tmp_path / "paper.pdf")
    ref = protocol.document_ref(doc, tmp_path, "doc-1", limit)
    assert (ref.file is not None) is (limit == 0)
    assert pickle.loads(pickle.dumps(ref)) == ref  # it travels over the pipe
    assert ref.load() == doc
    assert list(tmp_path.iterdir()) == []


def test_messages_are_named_and_travel_with_their_fields(tmp_path: Path) -> None:
    settings = SessionSettings(backend=resolve_backend("flash"), device="cpu")
    doc = Document(name="a.pdf", data=b"%PDF-1.4 %%EOF", page_count=1)
    stats = protocol.Stats(rss_mib=512.0, device_mib=None, seconds=0.5)
    error = mv.OutOfMemoryError("a.pdf: out of memory", document="a.pdf", device="cuda:0")
    messages = [
        protocol.Init(settings=settings, folder=str(tmp_path), inline_limit=1024),
        protocol.Parse(document=protocol.document_ref(doc, tmp_path, "d", 1024), options=ParseOptions(ocr_mode="txt")),
        protocol.Debug(command="allocate_mib", args=(1.0, False)),
        protocol.Exit(),
        protocol.Ready(pid=123, stats=stats),
        protocol.Result(payload=protocol.pack({"markdown": "x"}, tmp_path, "r", 1024), stats=stats),
        protocol.Error(error=error, traceback="Traceback ...", stats=stats),
        protocol.DebugReply(value=stats),
        protocol.Bye(models=2, stats=stats),
    ]
    for message in messages:
        back = pickle.loads(pickle.dumps(message))
        assert type(back) is type(message)
        if isinstance(message, protocol.Error):
            assert type(back.error) is mv.OutOfMemoryError
            assert back.error.device == "cuda:0"
        else:
            assert back == message


def test_portable_error_keeps_library_errors_and_wraps_the_rest() -> None:
    oom = mv.OutOfMemoryError("a.pdf: out of memory", document="a.pdf", device="cuda:0")
    assert protocol.portable_error(oom, "a.pdf") is oom

    unpicklable = mv.ParseError("a.pdf: failed", document="a.pdf", handle=threading.Lock())
    sent = protocol.portable_error(unpicklable, "a.pdf")
    assert type(sent) is mv.ParseError
    assert sent.document == "a.pdf"
    assert pickle.loads(pickle.dumps(sent)).document == "a.pdf"

    foreign = protocol.portable_error(RuntimeError("CUDA error: an illegal memory access"), "b.pdf")
    assert type(foreign) is mv.ParseError
    assert foreign.document == "b.pdf"
    assert "RuntimeError: CUDA error" in str(foreign)


def test_last_lines_of_a_log() -> None:
    assert "(the log is empty)" in handle.last_lines("")
    assert handle.last_lines("a\nb\nc", n=2) == "    b\n    c"


def _imports(path: Path, package: str) -> set[str]:
    """The ``mineru_vram`` modules a source file imports, lazily or not (``TYPE_CHECKING`` blocks aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("mineru_vram.")}


def _closure(start: str) -> set[str]:
    """Every ``mineru_vram`` module reachable from ``start`` by imports (the package ``__init__`` aside)."""
    src = Path(mv.__file__).parent.parent
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        file = src / (name.replace(".", "/") + ".py")
        package_init = src / name.replace(".", "/") / "__init__.py"
        if not file.is_file() and not package_init.is_file():
            continue  # a name imported from a module, not a module
        seen.add(name)
        path = file if file.is_file() else package_init
        package = name if path is package_init else name.rpartition(".")[0]
        todo.extend(_imports(path, package))
    return seen


def test_the_child_side_imports_nothing_of_the_parent_side_and_no_cycle_remains() -> None:
    child = _closure("mineru_vram._worker.child")
    assert {"mineru_vram._worker.protocol", "mineru_vram._inprocess", "mineru_vram._adapter"} <= child
    assert "mineru_vram._worker.runner" not in child
    assert "mineru_vram._worker.handle" not in child
    assert "mineru_vram._session" not in child
    assert "mineru_vram._worker.runner" in _closure("mineru_vram._session")
    for module in _closure("mineru_vram._session"):
        assert module == "mineru_vram._session" or "mineru_vram._session" not in _closure(module), module


def _settings(**kw: Any) -> SessionSettings:
    return SessionSettings(backend=resolve_backend("flash"), device="cpu", isolation="process", **kw)


def _sample(rss: float | None, device: float | None) -> dict[str, Any]:
    return {"rss_mib": rss, "device_mib": device}


def test_recycle_policy() -> None:
    worker_runner = runner.WorkerRunner(_settings(recycle_after=3, recycle_above_mib=100))
    first = _sample(900, 1200)
    worker = SimpleNamespace(documents=1, first=first)  # stand-in for a worker handle: only what the policy reads
    assert worker_runner._recycle_reason(worker, first) is None, "the first document is the reference"
    worker.documents = 2
    assert worker_runner._recycle_reason(worker, _sample(990, 1290)) is None
    reason = worker_runner._recycle_reason(worker, _sample(950, 1350))
    assert reason is not None
    assert "device memory grew 150 MiB" in reason
    assert "recycle_above_mib=100" in reason
    reason = worker_runner._recycle_reason(worker, _sample(1100, None))
    assert reason is not None
    assert "host RSS grew 200 MiB" in reason
    worker.documents = 3
    assert worker_runner._recycle_reason(worker, _sample(900, 1200)) == "recycle_after=3 documents reached"
    assert runner.WorkerRunner(_settings())._recycle_reason(worker, _sample(5000, 9000)) is None


def _dev(used: float, procs: dict[int, float]) -> DeviceMemory:
    return DeviceMemory(
        index=0,
        name="stand-in GPU",  # built by hand: the check is pure arithmetic on NVML's figures
        total_mib=80_000,
        used_mib=used,
        free_mib=80_000 - used,
        processes=tuple(ProcessMemory(pid=p, used_mib=m) for p, m in procs.items()),
    )


def test_device_back_check_allows_for_known_neighbours_only() -> None:
    base = _dev(1000, {100: 500})
    parent, worker = 300, 200

    def check(now: DeviceMemory) -> Any:
        return device.device_back(base, now, [worker], parent, tolerance_mib=32)

    ok = check(_dev(1010, {100: 500}))
    assert ok.back
    assert ok.excess_mib == 10

    listed = check(_dev(1700, {100: 500, worker: 700}))
    assert not listed.back
    assert listed.workers == {worker: 700}

    neighbour = check(_dev(1500, {100: 1000}))
    assert neighbour.back, "a process that held memory before the session may grow meanwhile"
    assert neighbour.others_grew_mib == 500

    this_process = check(_dev(1600, {100: 500, parent: 600}))
    assert this_process.back, "the parent's own growth is not the worker's"

    hidden = check(_dev(1700, {100: 500, 9999: 700}))
    assert not hidden.back, "an unknown new process may be the worker under a hidden pid"
    assert hidden.excess_mib == 700


_TRIM = textwrap.dedent(
    """
    import json
    from mineru_vram._probe import _rss_mib
    from mineru_vram._worker.child import malloc_trim

    blocks = [bytes(2000) for _ in range(100_000)]  # ~200 MiB through malloc (over pymalloc's limit)
    keep = blocks[::50]  # every 50th survives: the heap is fragmented and cannot shrink from its top
    del blocks
    before = _rss_mib()
    trimmed = malloc_trim()
    print(json.dumps({"before": before, "after": _rss_mib(), "trimmed": trimmed}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_malloc_trim_returns_a_fragmented_heap_to_the_os() -> None:
    out = subprocess.run([sys.executable, "-c", _TRIM], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout)
    if not got["trimmed"] and got["before"] - got["after"] < 1:
        pytest.skip("this libc has no malloc_trim (musl?)")
    assert got["before"] - got["after"] > 100, got


def test_isolated_sessions_bound_the_workers_memory_at_half_the_host_by_default() -> None:
    import psutil

    session = mv.ModelSession("flash", device="cpu", isolation="process", trust_env=False)
    assert session.settings.worker_memory_mib == "auto"
    total_mib = psutil.virtual_memory().total / 2**20
    assert runner.WorkerRunner(session.settings)._memory_limit_mib() == pytest.approx(total_mib / 2)
    lifted = mv.ModelSession("flash", device="cpu", isolation="process", worker_memory_mib=None, trust_env=False)
    assert runner.WorkerRunner(lifted.settings)._memory_limit_mib() is None
    fixed = mv.ModelSession("flash", device="cpu", isolation="process", worker_memory_mib=4096, trust_env=False)
    assert runner.WorkerRunner(fixed.settings)._memory_limit_mib() == 4096.0
