"""The worker module's parts that need no worker: payloads, errors, logs, policy, parent death."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

import mineru_vram as mv
from mineru_vram import _worker
from mineru_vram._config import resolve_backend
from mineru_vram._documents import Document
from mineru_vram._probe import DeviceMemory, ProcessMemory
from mineru_vram._session import SessionSettings


def test_small_payloads_go_inline_and_large_ones_through_a_file_that_is_removed(tmp_path: Path) -> None:
    small = {"markdown": "short"}
    ref = _worker._pack(small, tmp_path, "small", limit=1024)
    assert ref[0] == "inline"
    assert _worker._unpack(ref) == small

    big = {"images": {"a.png": b"\x89PNG" + bytes(4096)}}
    ref = _worker._pack(big, tmp_path, "big", limit=1024)
    assert ref[0] == "file"
    assert Path(ref[1]).parent == tmp_path
    assert _worker._unpack(ref) == big
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("limit", [0, 1 << 20], ids=["file", "inline"])
def test_documents_round_trip_by_either_route(tmp_path: Path, limit: int) -> None:
    doc = Document(name="paper.pdf", data=b"%PDF-1.4 body %%EOF", page_count=3, path=tmp_path / "paper.pdf")
    ref = _worker._document_ref(doc, tmp_path, "doc-1", limit)
    assert ("file" in ref) is (limit == 0)
    assert pickle.loads(pickle.dumps(ref))  # it travels over the pipe
    assert _worker._document_from_ref(ref) == doc
    assert list(tmp_path.iterdir()) == []


def test_portable_error_keeps_library_errors_and_wraps_the_rest() -> None:
    oom = mv.OutOfMemoryError("a.pdf: out of memory", document="a.pdf", device="cuda:0")
    assert _worker._portable_error(oom, "a.pdf") is oom

    unpicklable = mv.ParseError("a.pdf: failed", document="a.pdf", handle=threading.Lock())
    sent = _worker._portable_error(unpicklable, "a.pdf")
    assert type(sent) is mv.ParseError
    assert sent.document == "a.pdf"
    assert pickle.loads(pickle.dumps(sent)).document == "a.pdf"

    foreign = _worker._portable_error(RuntimeError("CUDA error: an illegal memory access"), "b.pdf")
    assert type(foreign) is mv.ParseError
    assert foreign.document == "b.pdf"
    assert "RuntimeError: CUDA error" in str(foreign)


def test_signal_names() -> None:
    assert _worker._signal_name(-signal.SIGKILL) == "SIGKILL"
    assert _worker._signal_name(-signal.SIGSEGV) == "SIGSEGV"
    assert _worker._signal_name(0) is None
    assert _worker._signal_name(1) is None
    assert _worker._signal_name(None) is None


def test_log_tail_and_trim(tmp_path: Path) -> None:
    log = tmp_path / "worker-1.log"
    assert _worker._log_tail(log) == ""
    log.write_bytes(b"x" * 200_000 + b"\nlast line\n")
    assert _worker._log_tail(log, 10) == "last line\n"
    _worker._trim_log(log, limit=1_000_000)
    assert log.stat().st_size == 200_011, "under the limit nothing is cut"
    _worker._trim_log(log, limit=100_000)
    text = log.read_text()
    assert text.startswith("[... earlier log cut")
    assert text.endswith("x\nlast line\n")
    assert log.stat().st_size < 100_000
    assert "(the log is empty)" in _worker._last_lines("")
    assert _worker._last_lines("a\nb\nc", n=2) == "    b\n    c"


def _settings(**kw: Any) -> SessionSettings:
    return SessionSettings(backend=resolve_backend("flash"), device="cpu", isolation="process", **kw)


def _sample(rss: float | None, device: float | None) -> dict[str, Any]:
    return {"rss_mib": rss, "device_mib": device}


def test_recycle_policy() -> None:
    runner = _worker.WorkerRunner(_settings(recycle_after=3, recycle_above_mib=100))
    first = _sample(900, 1200)
    worker = SimpleNamespace(documents=1, first=first)  # stand-in for a worker handle: only what the policy reads
    assert runner._recycle_reason(worker, first) is None, "the first document is the reference"
    worker.documents = 2
    assert runner._recycle_reason(worker, _sample(990, 1290)) is None
    reason = runner._recycle_reason(worker, _sample(950, 1350))
    assert reason is not None
    assert "device memory grew 150 MiB" in reason
    assert "recycle_above_mib=100" in reason
    reason = runner._recycle_reason(worker, _sample(1100, None))
    assert reason is not None
    assert "host RSS grew 200 MiB" in reason
    worker.documents = 3
    assert runner._recycle_reason(worker, _sample(900, 1200)) == "recycle_after=3 documents reached"
    assert _worker.WorkerRunner(_settings())._recycle_reason(worker, _sample(5000, 9000)) is None


def test_launcher_starts_everything_from_one_long_lived_thread() -> None:
    idents: list[int] = []

    def from_short_lived_thread() -> None:
        idents.append(_worker._launcher.call(threading.get_ident))

    for _ in range(3):
        t = threading.Thread(target=from_short_lived_thread)
        t.start()
        t.join()
    assert len(set(idents)) == 1
    assert idents[0] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        _worker._launcher.call(lambda: 1 / 0)


_MIDDLE = textwrap.dedent(
    """
    import subprocess, sys
    code = (
        "import os, sys, time\\n"
        "from mineru_vram._worker import _die_with_parent\\n"
        "_die_with_parent(os.getppid(), pdeathsig=sys.argv[1] == '1', watchdog=sys.argv[2] == '1')\\n"
        "print('ready', flush=True)\\n"
        "time.sleep(60)\\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE,
                         start_new_session=True)
    assert p.stdout.readline() == b"ready\\n"
    print(p.pid, flush=True)
    """
)


@pytest.mark.parametrize(("pdeathsig", "watchdog"), [(True, False), (False, True)], ids=["pdeathsig", "watchdog"])
def test_each_mechanism_alone_ends_a_child_whose_parent_died(pdeathsig: bool, watchdog: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MIDDLE, str(int(pdeathsig)), str(int(watchdog))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    child = int(out.stdout.strip())  # the middle process has exited: the child is an orphan now
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            proc = psutil.Process(child)
            if proc.status() == psutil.STATUS_ZOMBIE and proc.num_threads() <= 1:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    else:
        psutil.Process(child).kill()
        pytest.fail(f"the orphaned child {child} was still alive 2 s after its parent exited")


def test_stale_runner_folders_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    def folder(name: str, *, lock_file: bool = True, age: float = 3600.0) -> Path:
        path = tmp_path / f"{_worker._FOLDER_PREFIX}{name}"
        path.mkdir()
        (path / "worker-1.log").write_text("log")
        if lock_file:
            (path / _worker._LOCK_NAME).touch()
        old = time.time() - age
        os.utime(path, (old, old))
        return path

    stale = folder("1-dead")
    live = folder("2-live")
    held = _worker._lock_folder(live)
    young = folder("3-young", age=0)
    unlocked = folder("4-nolock", lock_file=False)
    other = tmp_path / "someone-elses-folder"
    other.mkdir()
    try:
        removed = _worker._sweep_stale_folders(tmp_path)
    finally:
        assert held is not None
        held.close()
    assert removed == [stale]
    assert not stale.exists()
    assert live.exists()
    assert young.exists()
    assert unlocked.exists()
    assert other.exists()


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
        return _worker._device_back(base, now, [worker], parent, tolerance_mib=32)

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
    from mineru_vram._worker import _malloc_trim

    blocks = [bytes(2000) for _ in range(100_000)]  # ~200 MiB through malloc (over pymalloc's limit)
    keep = blocks[::50]  # every 50th survives: the heap is fragmented and cannot shrink from its top
    del blocks
    before = _rss_mib()
    trimmed = _malloc_trim()
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
