"""Process isolation with real spawned workers on CPU.

Mechanics that do not depend on model weights (timeouts, recycling, error
transport, release) use the ``flash`` backend, whose worker parses text PDFs with
MinerU's real code but loads no model, so a worker starts in well under a second.
What needs models (results equal to in-process, a crash mid-parse, the parent
dying with models loaded) uses the random-weight model tree.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import mineru_vram as mv
from mineru_vram._inprocess import ParseOptions
from mineru_vram._worker import protocol
from mineru_vram._worker import runner as worker_runner
from mineru_vram.testing import make_pdf
from support import alive, all_gone, wait_for

PDF = make_pdf(2)


def _group_alive(pgid: int) -> list[int]:
    """Live members of a process group (each worker runs in its own, led by its keeper)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and alive(proc.pid):
                out.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return out


def _comparable(result: mv.ParseResult) -> dict[str, Any]:
    # Everything but wall times, which differ run to run.
    return {
        "document": result.document,
        "markdown": result.markdown,
        "content_list": result.content_list,
        "middle_json": result.middle_json,
        "images": dict(result.images),
        "page_count": result.page_count,
        "backend": result.backend,
        "device": result.device,
    }


@pytest.fixture
def flash_session() -> Iterator[mv.ModelSession]:
    session = mv.ModelSession("flash", device="cpu", isolation="process", trust_env=False)
    yield session
    session.close()


def _runner(session: mv.ModelSession) -> worker_runner.WorkerRunner:
    runner = session.runner
    assert isinstance(runner, worker_runner.WorkerRunner)
    return runner


# --- release --------------------------------------------------------------------------------


def test_exit_stops_the_worker_and_writes_a_process_receipt(flash_session: mv.ModelSession) -> None:
    with flash_session as s:
        runner = _runner(s)
        pid = runner.pid
        assert pid is not None
        assert pid != os.getpid()
        assert alive(pid)
        pgid = os.getpgid(pid)
        assert pgid != os.getpgid(0), "the worker runs in a process group of its own"
        result = s.parse(PDF, name="a.pdf")
        folder = runner.folder
        assert folder is not None
        assert folder.is_dir()
    assert result.document == "a.pdf"
    assert result.page_count == 2
    assert result.markdown.strip()
    assert not alive(pid)
    assert _group_alive(pgid) == []
    assert not folder.exists(), "the runner's folder (logs, payloads) is removed on close"
    report = s.release_report
    assert report is not None
    assert report.isolation == "process"
    assert report.context_created is False
    assert report.worker["pid"] == pid
    assert report.worker["exitcode"] == 0, "a graceful exit, not a kill"
    assert report.worker["documents"] == 1
    assert report.worker["workers_started"] == 1
    assert report.worker["restarts"] == report.worker["recycles"] == 0
    assert report.worker["left"] == []
    assert report.worker["stop_seconds"] < 5
    assert report.worker["back_at_baseline"] is None, "on CPU NVML cannot tell, and the receipt must not claim it"
    assert report.worker["seconds_to_baseline"] is None
    assert any(f"started worker pid {pid}" in e for e in report.events)
    assert report.ok
    assert s.close() is report, "close is idempotent"


@pytest.mark.asyncio
async def test_async_with_parses_in_the_worker() -> None:
    async with mv.ModelSession("flash", device="cpu", isolation="process", trust_env=False) as s:
        pid = _runner(s).pid
        result = await s.aparse(PDF, name="async.pdf")
        assert result.document == "async.pdf"
        assert _runner(s).samples[-1]["pid"] == pid
    assert pid is not None
    assert not alive(pid)
    assert s.release_report is not None
    assert s.release_report.worker["documents"] == 1


def test_invalid_documents_are_rejected_before_the_worker(flash_session: mv.ModelSession) -> None:
    with flash_session as s:
        with pytest.raises(mv.NotAPdfError) as err:
            s.parse(b"hello, not a pdf", name="notes.txt")
        assert err.value.document == "notes.txt"
        assert _runner(s).documents == 0
        assert s.parse(PDF).page_count == 2


def test_a_session_opened_from_a_thread_that_ends_keeps_its_worker() -> None:
    # The kernel's parent-death signal follows the thread that started a child, not the
    # process: opening from a short-lived thread (an executor, a request handler) must not
    # cost the worker when that thread ends.
    opened: list[mv.ModelSession] = []
    thread = threading.Thread(
        target=lambda: opened.append(
            mv.ModelSession("flash", device="cpu", isolation="process", trust_env=False).open()
        )
    )
    thread.start()
    thread.join()
    s = opened[0]
    try:
        runner = _runner(s)
        pid = runner.pid
        assert s.parse(PDF).page_count == 2
        assert runner.pid == pid
        assert runner.restarts == runner.crashes == 0
    finally:
        s.close()


# --- errors across the boundary -------------------------------------------------------------


def test_mineru_errors_in_the_worker_arrive_typed_with_attributes(flash_session: mv.ModelSession) -> None:
    with flash_session as s:
        runner = _runner(s)
        pid = runner.pid
        doc = s.load(PDF, name="bad-mode.pdf")
        # ocr_mode is validated by the session; the runner lets a bad one reach MinerU,
        # which raises inside the worker.
        with pytest.raises(mv.ParseError) as err:
            runner.parse(doc, ParseOptions(ocr_mode="nonsense"))
        assert type(err.value) is mv.ParseError
        assert err.value.document == "bad-mode.pdf"
        assert "bad-mode.pdf" in str(err.value)
        assert any("raised in the mineru-vram worker" in n for n in getattr(err.value, "__notes__", []))
        assert runner.pid == pid, "an error in a document does not cost the worker"
        assert s.parse(PDF).page_count == 2


@pytest.mark.parametrize(
    "exc",
    [
        mv.OutOfMemoryError("big.pdf: the device cuda:0 ran out of memory", document="big.pdf", device="cuda:0"),
        mv.EncryptedDocumentError("locked.pdf: password protected", document="locked.pdf"),
        mv.ParseTimeoutError("slow.pdf: no result", document="slow.pdf", timeout=3.0),
    ],
    ids=lambda e: type(e).__name__,
)
def test_library_errors_keep_type_and_attributes_through_the_worker(
    flash_session: mv.ModelSession, exc: mv.MineruVramError
) -> None:
    with flash_session as s, pytest.raises(type(exc)) as err:
        _runner(s)._debug_raise(exc)
    assert type(err.value) is type(exc)
    assert str(err.value) == str(exc)
    assert err.value._attrs == exc._attrs


def test_foreign_errors_in_the_worker_become_parse_errors(flash_session: mv.ModelSession) -> None:
    with flash_session as s:
        with pytest.raises(mv.ParseError, match="KeyError"):
            _runner(s)._debug_raise(KeyError("layout"))
        assert _runner(s).crashes == 0


# --- crashes, hangs, timeouts ---------------------------------------------------------------


def test_hung_worker_is_killed_by_the_parse_timeout(flash_session: mv.ModelSession, caplog: Any) -> None:
    with flash_session as s:
        runner = _runner(s)
        s.parse(PDF)  # warm: MinerU imported in the worker
        pid = runner.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a worker that never answers, whatever it is stuck in
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="mineru_vram"), pytest.raises(mv.ParseTimeoutError) as err:
            s.parse(PDF, name="hangs.pdf", timeout=1.0)
        waited = time.monotonic() - t0
        assert 1.0 <= waited < 4.0
        assert isinstance(err.value, TimeoutError)
        assert err.value.document == "hangs.pdf"
        assert err.value.timeout == 1.0
        assert err.value.pid == pid
        assert not alive(pid)
        assert "timeout" in caplog.text
        again = s.parse(PDF, name="after.pdf")
        assert again.document == "after.pdf"
        assert runner.pid not in (None, pid)
        assert runner.restarts == 1
        assert runner.timeouts == 1
    report = s.release_report
    assert report is not None
    assert report.worker["timeouts"] == 1
    assert any("hangs.pdf" in e and "timeout" in e for e in report.events)
    assert any("restarted the worker" in e for e in report.events)


def test_a_hung_worker_is_killed_by_the_default_bound_which_the_error_names(
    flash_session: mv.ModelSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    with flash_session as s, concurrent.futures.ThreadPoolExecutor(1) as pool:
        runner = _runner(s)
        s.parse(PDF)  # warm: MinerU imported in the worker
        # The default bound, shrunk so the test does not wait minutes: 1 s + 0.5 s a page.
        monkeypatch.setattr(worker_runner, "PARSE_TIMEOUT_BASE_SECONDS", 1.0)
        monkeypatch.setattr(worker_runner, "PARSE_TIMEOUT_PER_PAGE_SECONDS", 0.5)
        pid = runner.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a worker that never answers
        try:
            future = pool.submit(s.parse, PDF, name="hangs.pdf")  # no timeout given
            with pytest.raises(mv.ParseTimeoutError) as err:
                future.result(timeout=60)  # before the default existed, this parse waited for ever
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert err.value.timeout == 2.0, "1 s + 0.5 s for each of the 2 pages"
        assert err.value.document == "hangs.pdf"
        assert "default bound" in str(err.value)
        assert "timeout=None" in str(err.value), "the error says how to lift the bound"
        assert not alive(pid)
        assert runner.timeouts == 1
        monkeypatch.undo()  # a fresh worker's first parse imports MinerU: more than 2 s on a busy machine
        assert s.parse(PDF, name="after.pdf").document == "after.pdf"


def test_timeout_none_lifts_the_bound(flash_session: mv.ModelSession, monkeypatch: pytest.MonkeyPatch) -> None:
    with flash_session as s, concurrent.futures.ThreadPoolExecutor(1) as pool:
        runner = _runner(s)
        s.parse(PDF)
        monkeypatch.setattr(worker_runner, "PARSE_TIMEOUT_BASE_SECONDS", 0.1)
        monkeypatch.setattr(worker_runner, "PARSE_TIMEOUT_PER_PAGE_SECONDS", 0.1)
        pid = runner.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            future = pool.submit(s.parse, PDF, name="patient.pdf", timeout=None)
            with pytest.raises(concurrent.futures.TimeoutError):
                future.result(timeout=2.0)  # well past the default bound: still waiting
        finally:
            os.kill(pid, signal.SIGCONT)
        assert future.result(timeout=60).document == "patient.pdf"
        assert runner.pid == pid
        assert runner.timeouts == 0


def test_close_waits_for_a_parse_in_another_thread_with_a_bound_it_names(flash_session: mv.ModelSession) -> None:
    s = flash_session.open()
    runner = _runner(s)
    s.parse(PDF)
    pid = runner.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the parse below waits on a worker that does not answer
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parsing = pool.submit(s.parse, PDF, name="slow.pdf", timeout=None)
        try:

            def worker_busy() -> bool:  # the parse holds the runner's lock while it waits on the worker
                if runner._lock.acquire(blocking=False):
                    runner._lock.release()
                    return False
                return True

            assert wait_for(worker_busy, timeout=30)
            closing = pool.submit(s.close, timeout=1.0)
            with pytest.raises(mv.SessionStateError, match=r"waited 1s") as info:
                closing.result(timeout=60)  # without a bound, close waited as long as the parse
            assert info.value.timeout == 1.0
            assert s.state is mv.SessionState.CLOSING
            assert alive(pid), "nothing was stopped under the running parse"
            with pytest.raises(mv.SessionStateError, match="closing"):
                s.parse(PDF)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert parsing.result(timeout=60).document == "slow.pdf"
    report = s.close()
    assert report is not None
    assert report.worker["documents"] == 2
    assert report.worker["exitcode"] == 0
    assert s.state is mv.SessionState.CLOSED


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), "soon"])
def test_timeout_must_be_positive_auto_or_none(flash_session: mv.ModelSession, timeout: Any) -> None:
    with flash_session as s, pytest.raises(mv.ConfigurationError, match="timeout="):
        s.parse(PDF, timeout=timeout)


def test_worker_killed_while_idle_is_replaced_on_the_next_parse(flash_session: mv.ModelSession) -> None:
    with flash_session as s:
        runner = _runner(s)
        pid = runner.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not alive(pid), timeout=5.0)
        result = s.parse(PDF, name="next.pdf")
        assert result.document == "next.pdf"
        assert runner.pid != pid
        assert runner.restarts == 1
        assert any("exited while idle" in e and "SIGKILL" in e for e in runner.events)


# --- recycling ------------------------------------------------------------------------------


def test_recycle_after_n_documents() -> None:
    with mv.ModelSession("flash", device="cpu", isolation="process", recycle_after=2, trust_env=False) as s:
        runner = _runner(s)
        for i in range(5):
            s.parse(PDF, name=f"doc{i}.pdf")
        pids = [sample["pid"] for sample in runner.samples]
    a, b, c = pids[0], pids[2], pids[4]
    assert pids == [a, a, b, b, c]
    assert len({a, b, c}) == 3
    assert not any(alive(p) for p in (a, b, c))
    report = s.release_report
    assert report is not None
    recycled = [e for e in report.events if e.startswith("recycled")]
    assert len(recycled) == 2
    assert all("recycle_after=2" in e for e in recycled)
    assert report.worker["recycles"] == 2
    assert report.worker["restarts"] == 0
    assert [h["documents"] for h in report.worker["history"]] == [2, 2, 1]


def test_recycle_when_the_worker_grows() -> None:
    with mv.ModelSession("flash", device="cpu", isolation="process", recycle_above_mib=150, trust_env=False) as s:
        runner = _runner(s)
        s.parse(PDF, name="first.pdf")
        s.parse(PDF, name="second.pdf")
        assert runner.recycles == 0, f"no growth, no recycle: {list(runner.samples)}"
        grown = runner.pid
        runner._debug_allocate_mib(300)  # test hook: the worker now holds 300 MiB more, as a leak would
        s.parse(PDF, name="third.pdf")
        assert runner.recycles == 1
        assert runner.pid is None, "the grown worker is retired between documents"
        s.parse(PDF, name="fourth.pdf")
        fresh = runner.pid
        samples = list(runner.samples)
    assert fresh not in (None, grown)
    assert grown is not None
    assert not alive(grown)
    by_doc = {x["document"]: x for x in samples}
    assert by_doc["third.pdf"]["pid"] == grown
    assert by_doc["third.pdf"]["rss_mib"] - by_doc["first.pdf"]["rss_mib"] > 250
    assert by_doc["fourth.pdf"]["pid"] == fresh
    assert by_doc["fourth.pdf"]["rss_mib"] < by_doc["third.pdf"]["rss_mib"] - 200
    report = s.release_report
    assert report is not None
    (event,) = [e for e in report.events if e.startswith("recycled")]
    assert f"pid {grown}" in event
    assert "host RSS grew" in event
    assert "recycle_above_mib=150" in event


# --- payloads -------------------------------------------------------------------------------


def test_large_documents_and_results_travel_through_files(
    flash_session: mv.ModelSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_runner, "INLINE_LIMIT", 0)  # every payload is "large"; the worker reads it at start
    with flash_session as s:
        runner = _runner(s)
        assert runner.folder is not None
        seen: list[str] = []
        original = protocol.unpack

        def spy(payload: protocol.Payload) -> Any:  # stand-in wrapper: records the route, then the real unpack
            seen.append(payload.route)
            return original(payload)

        monkeypatch.setattr(protocol, "unpack", spy)
        through_files = s.parse(PDF, name="same.pdf")
        monkeypatch.setattr(worker_runner, "INLINE_LIMIT", 1 << 40)
        leftovers = sorted(p.name for p in runner.folder.iterdir() if p.suffix in (".pickle", ".pdf"))
    assert seen == ["file"]
    assert leftovers == [], "payload files are removed once read"
    with mv.ModelSession("flash", device="cpu", trust_env=False) as inproc:
        direct = inproc.parse(PDF, name="same.pdf")
    assert _comparable(through_files) == _comparable(direct)


# --- start failures -------------------------------------------------------------------------


def test_missing_models_raise_the_same_typed_error_as_in_process(tmp_path: Path) -> None:
    session = mv.ModelSession("pipeline", device="cpu", isolation="process", models_dir=tmp_path, trust_env=False)
    with pytest.raises(mv.ModelsNotAvailableError) as err:
        session.open()
    assert err.value.missing == ["MinerU-4_models_torch"]
    assert err.value.models_dir == str(tmp_path)
    assert session.state is mv.SessionState.CLOSED
    note = "\n".join(err.value.__notes__)
    found = re.search(r"in the mineru-vram worker \(pid (\d+)\) while loading", note)
    assert found, note
    assert all_gone([int(found.group(1))], timeout=10), "the worker that failed to load is gone"


def test_worker_that_does_not_load_in_time_raises_start_error(random_models_dir: Path) -> None:
    session = mv.ModelSession(
        "pipeline",
        device="cpu",
        isolation="process",
        models_dir=random_models_dir,
        worker_start_timeout=0.5,
        trust_env=False,
    )
    with pytest.raises(mv.WorkerStartError) as err:
        session.open()
    assert "worker_start_timeout=0.5" in str(err.value)
    assert err.value.log_tail is not None
    assert not alive(err.value.pid)
    assert session.state is mv.SessionState.CLOSED


# --- with models ----------------------------------------------------------------------------


def _real_or_generated() -> tuple[str, bytes]:
    """The corpus's one-page paper (text, a table, formulas) where present, else a generated page."""
    test_pdf = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "test.pdf"
    if test_pdf.is_file():
        return "test.pdf", test_pdf.read_bytes()
    return "generated.pdf", make_pdf(1)


@pytest.mark.slow
def test_isolated_results_equal_in_process_results(random_models_dir: Path) -> None:
    # One document: each side pays a model load and MinerU's lazy loads on its first page.
    name, data = _real_or_generated()
    with mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, trust_env=False) as s:
        expected = _comparable(s.parse(data, name=name))
    with mv.ModelSession(
        "pipeline", device="cpu", models_dir=random_models_dir, isolation="process", trust_env=False
    ) as iso:
        got = _comparable(iso.parse(data, name=name))
        pid = _runner(iso).pid
    assert expected["markdown"], "a real parse, not an empty one"
    assert got == expected
    assert pid is not None
    assert not alive(pid)
    report = iso.release_report
    assert report is not None
    assert report.models_released >= 2, "the worker held MinerU's OCR and layout models"
    assert report.worker["exitcode"] == 0


@pytest.mark.slow
def test_worker_sigkill_mid_parse_raises_crashed_and_the_next_parse_works(random_models_dir: Path) -> None:
    long_doc = make_pdf(2)
    with mv.ModelSession(
        "pipeline", device="cpu", models_dir=random_models_dir, isolation="process", trust_env=False
    ) as s:
        runner = _runner(s)
        pid = runner.pid
        assert pid is not None
        pgid = os.getpgid(pid)
        worker = psutil.Process(pid)
        cpu0 = sum(worker.cpu_times()[:2])
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(s.parse, long_doc, name="victim.pdf")
            # Kill once the worker is visibly working on the document.
            deadline = time.monotonic() + 60
            while sum(worker.cpu_times()[:2]) - cpu0 < 0.5 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not future.done(), "the parse finished before the kill; use a longer document"
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(mv.WorkerCrashedError) as err:
                future.result(timeout=30)
        assert err.value.document == "victim.pdf"
        assert err.value.exitcode == -signal.SIGKILL
        assert err.value.signal == "SIGKILL"
        assert err.value.pid == pid
        assert err.value.log_tail, "the tail of the worker's log comes with the error"
        assert "victim.pdf" in str(err.value)
        # The whole group got SIGKILL; let the helpers finish dying.
        assert wait_for(lambda: _group_alive(pgid) == [], timeout=5), "nothing the worker started survives it"
        assert runner.pid is None
        after = s.parse(make_pdf(1), name="next.pdf")
        assert after.page_count == 1
        assert runner.pid not in (None, pid)
        assert runner.restarts == 1
    report = s.release_report
    assert report is not None
    assert report.worker["crashes"] == 1
    assert any("crashed while parsing victim.pdf" in e for e in report.events)
    assert any("restarted the worker" in e and "victim.pdf" in e for e in report.events)


_PARENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import mineru_vram as mv
    from mineru_vram.testing import make_pdf

    def main():
        s = mv.ModelSession("pipeline", device="cpu", models_dir=sys.argv[1], isolation="process", trust_env=False)
        s.open()
        heavy = [m for m in ("torch", "mineru", "transformers") if m in sys.modules]
        print(json.dumps({"worker": s.runner.pid, "heavy": heavy}), flush=True)
        pdf = make_pdf(3)
        while True:
            s.parse(pdf)

    if __name__ == "__main__":
        main()
    """
)


def test_worker_dies_within_a_second_of_a_sigkilled_parent(random_models_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT_SCRIPT, encoding="utf-8")
    parent = subprocess.Popen(
        [sys.executable, str(script), str(random_models_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, f"the parent script died early (exit code {parent.poll()})"
        info = json.loads(line)
        worker = int(info["worker"])
        assert info["heavy"] == [], "the parent never imports torch or MinerU for the worker"
        assert alive(worker)
        pgid = os.getpgid(worker)
        time.sleep(0.5)  # the worker is parsing now
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        gone = wait_for(lambda: not alive(worker), timeout=1.0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
    stale = sorted(Path(tempfile.gettempdir()).glob(f"{worker_runner.FOLDER_PREFIX}{parent.pid}-*"))
    try:
        assert gone, f"worker {worker} outlived its SIGKILLed parent by more than 1 s"
        # The group went with it: what the worker started (MinerU's PDF render processes,
        # multiprocessing's resource tracker) must not outlive it.
        assert wait_for(lambda: _group_alive(pgid) == [], timeout=10), "helpers the worker started outlived it"
        # The killed parent could not remove its runner folder; the next runner removes it.
        assert len(stale) == 1, stale
        with mv.ModelSession("flash", device="cpu", isolation="process", trust_env=False):
            pass
        assert not stale[0].exists(), "the next runner sweeps the folder of a dead owner"
    finally:
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)


def test_a_worker_over_its_memory_bound_is_killed_typed_and_the_session_goes_on() -> None:
    # The bound is far under what a worker with MinerU imported holds, so the first poll during the
    # parse finds it over: the mechanism a runaway document (pages named thousands of times) meets.
    with mv.ModelSession("flash", device="cpu", isolation="process", worker_memory_mib=50, trust_env=False) as s:
        first_pid = s.runner.pid  # type: ignore[union-attr]
        with pytest.raises(mv.WorkerCrashedError, match="worker_memory_mib=50") as info:
            s.parse(PDF, name="a.pdf")
        err = info.value
        assert err.reason == "memory"
        assert err.limit_mib == 50
        assert err.memory_mib > 50
        assert err.document == "a.pdf"
        assert not alive(first_pid)
        assert s.state is mv.SessionState.OPENED
    assert s.release_report is not None
    assert "memory" in " ".join(s.release_report.events)
