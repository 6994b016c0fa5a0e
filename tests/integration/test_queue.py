"""TaskQueue with real SQLite, real MinerU code and real processes, on CPU.

Volume and fault tests use the ``flash`` backend (MinerU's model-free tier: its real
parsing code, about a tenth of a second per small document), so 200 tasks and a
kill -9 fit in CI. Nothing is faked: the worker loop, the session, MinerU, the
database, the files and the signals are the real ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
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

import pytest

import mineru_vram as mv
from mineru_vram import (
    ResultTimeoutError,
    TaskCancelledError,
    TaskFailedError,
    TaskNotFoundError,
    TaskQueue,
    TaskStatus,
)
from mineru_vram._cli import run_worker_cli
from mineru_vram._files import OwnerLock
from mineru_vram._queue.worker import Worker, new_owner
from mineru_vram.testing import make_pdf
from support import all_gone, wait_for

PDF = make_pdf(1)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's temporary folder, private to the test, to find leftovers in."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[TaskQueue]:
    q = TaskQueue(tmp_path / "tasks.db", backend="flash", device="cpu", retry_backoff=0.05)
    yield q
    q.close()


def _completed_events(q: TaskQueue) -> collections.Counter[str]:
    return collections.Counter(e["task_id"] for e in q.events() if e["event"] == "completed")


def _leftovers(q: TaskQueue) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(q.storage / sub)) for sub in ("inputs", "work")}


def _start_worker(db: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mineru_vram", "worker", str(db), *args],  # the real command line
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: MinerU's render helpers go with it
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _lock(q: TaskQueue) -> tuple[str, OwnerLock]:
    """A worker id and its lock file, held as a running worker holds its own."""
    owner = new_owner()
    return owner, OwnerLock(q.storage / "workers" / f"{owner}.lock")


# --- volume -----------------------------------------------------------------------------------


def test_two_hundred_tasks_none_lost_each_completed_once(queue: TaskQueue, private_tmp: Path, tmp_path: Path) -> None:
    on_disk = tmp_path / "on-disk.pdf"
    on_disk.write_bytes(PDF)
    ids = []
    for i in range(200):
        source: Any = on_disk if i % 3 == 0 else PDF  # paths and bytes both get copied in
        ids.append(queue.submit(source, name=f"doc-{i:03d}.pdf"))
    assert len(set(ids)) == 200
    assert queue.counts()[TaskStatus.PENDING] == 200
    assert len(os.listdir(queue.storage / "inputs")) == 200
    on_disk.unlink()  # the queue has its own copy

    stats = queue.run(until_idle=True)

    assert (stats.completed, stats.failed, stats.retried, stats.lost) == (200, 0, 0, 0)
    assert queue.counts()[TaskStatus.COMPLETED] == 200
    assert set(_completed_events(queue).values()) == {1}
    assert set(_completed_events(queue)) == set(ids)
    for i, task_id in enumerate(ids):
        info = queue.status(task_id)
        assert info.status is TaskStatus.COMPLETED
        assert info.attempts == 1
        assert info.started_at is not None
        assert info.finished_at is not None
        assert info.submitted_at <= info.started_at <= info.finished_at
        assert info.has_result
        assert info.worker is None  # the lease is gone with the task
        if i % 40 == 0:
            result = queue.result(task_id, timeout=0)
            assert result.document == f"doc-{i:03d}.pdf"
            assert result.markdown.startswith("# mineru-vram demo document")
    # Tasks ran in submission order (one worker, equal priorities).
    starts = [queue.status(t).started_at for t in ids]
    assert starts == sorted(starts)
    # Inputs and temporaries are gone; results are kept (keep_results=True).
    assert _leftovers(queue) == {"inputs": [], "work": []}
    assert len(os.listdir(queue.storage / "results")) == 200
    assert os.listdir(private_tmp) == []


def test_bad_documents_fail_with_the_reason_while_the_rest_complete(queue: TaskQueue) -> None:
    good = [queue.submit(PDF, name=f"good-{i}.pdf") for i in range(4)]
    bad = {
        "not-a-pdf.pdf": (b"hello, world" * 10, "NotAPdfError", "not a pdf"),
        "empty.pdf": (b"", "EmptyDocumentError", "empty"),
        "truncated.pdf": (PDF[: len(PDF) // 2], "TruncatedDocumentError", "cut short"),
    }
    bad_ids = {queue.submit(data, name=name): (name, kind, words) for name, (data, kind, words) in bad.items()}
    good.append(queue.submit(PDF, name="after-the-bad-ones.pdf"))

    stats = queue.run(until_idle=True)

    assert (stats.completed, stats.failed, stats.retried) == (5, 3, 0)
    for task_id in good:
        assert queue.status(task_id).status is TaskStatus.COMPLETED
    for task_id, (name, kind, words) in bad_ids.items():
        info = queue.status(task_id)
        assert info.status is TaskStatus.FAILED
        assert info.attempts == 1  # the document's fault: not retried
        assert info.error_type == kind
        assert name in (info.error or "")
        assert words in (info.error or "").lower()
        with pytest.raises(TaskFailedError) as failed:
            queue.result(task_id)
        assert failed.value.error_type == kind
        assert failed.value.task_id == task_id
    assert _leftovers(queue) == {"inputs": [], "work": []}


def test_cancelled_tasks_never_run(queue: TaskQueue) -> None:
    ids = [queue.submit(PDF, name=f"doc-{i}.pdf") for i in range(6)]
    cancelled = ids[1::2]
    assert all(queue.cancel(t) for t in cancelled)
    assert not queue.cancel(cancelled[0])  # already ended
    with pytest.raises(TaskNotFoundError):
        queue.cancel("no-such-task")

    queue.run(until_idle=True)

    for task_id in cancelled:
        info = queue.status(task_id)
        assert info.status is TaskStatus.CANCELLED
        assert info.attempts == 0
        assert info.started_at is None
        assert [e["event"] for e in queue.events(task_id)] == ["submitted", "cancelled"]
        with pytest.raises(TaskCancelledError):
            queue.result(task_id)
    assert not queue.cancel(ids[0])  # completed: nothing to cancel
    assert queue.counts()[TaskStatus.COMPLETED] == 3
    assert queue.tasks(TaskStatus.CANCELLED) == [queue.status(t) for t in cancelled]
    assert _leftovers(queue) == {"inputs": [], "work": []}


def test_results_deleted_after_retrieval_when_not_kept(tmp_path: Path) -> None:
    with TaskQueue(tmp_path / "q.db", backend="flash", device="cpu", keep_results=False) as q:
        task_id = q.submit(PDF, name="once.pdf")
        with pytest.raises(ResultTimeoutError):
            q.result(task_id, timeout=0.05)  # no worker yet
        q.run(until_idle=True)
        assert q.result(task_id).document == "once.pdf"
        assert os.listdir(q.storage / "results") == []
        assert q.status(task_id).status is TaskStatus.COMPLETED
        with pytest.raises(TaskNotFoundError, match="deleted after it was retrieved"):
            q.result(task_id)
        assert q.forget(task_id)
        with pytest.raises(TaskNotFoundError):
            q.status(task_id)


def test_run_on_the_callers_open_session_leaves_it_open(tmp_path: Path) -> None:
    with (
        TaskQueue(tmp_path / "q.db", backend="pipeline", durable=False) as q,
        mv.ModelSession("flash", device="cpu", trust_env=False) as session,
    ):
        ids = [q.submit(PDF, name=f"mine-{i}.pdf") for i in range(3)]
        stats = q.run(until_idle=True, session=session)  # the queue's own backend does not apply
        assert stats.completed == 3
        assert stats.sessions == 1
        assert session.state is mv.SessionState.OPENED
        assert session.documents_parsed == 3
        assert [q.result(t).backend for t in ids] == ["flash"] * 3
    with pytest.raises(mv.SessionStateError, match="open session"), TaskQueue(tmp_path / "q.db") as q:
        q.run(until_idle=True, session=session)


def test_transient_failures_are_retried_with_backoff(queue: TaskQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    import mineru.parser.mineru_parser as mineru_parser

    real = mineru_parser.doc_analyze
    calls: list[float] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.time())
        if len(calls) <= 2:  # inside MinerU's call: a pipe to its render helpers breaks, twice
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(mineru_parser, "doc_analyze", flaky)
    task_id = queue.submit(PDF, name="flaky.pdf")
    stats = queue.run(until_idle=True)
    info = queue.status(task_id)
    assert info.status is TaskStatus.COMPLETED
    assert info.attempts == 3
    assert info.error is None
    assert (stats.completed, stats.retried) == (1, 2)
    assert [e["event"] for e in queue.events(task_id)] == [
        "submitted", "claimed", "retry", "claimed", "retry", "claimed", "completed",
    ]  # fmt: skip
    # Backoff doubles: 0.05 s, then 0.1 s between attempts.
    assert calls[1] - calls[0] >= 0.05
    assert calls[2] - calls[1] >= 0.1

    calls.clear()
    doomed = queue.submit(PDF, name="doomed.pdf", max_attempts=2)
    queue.run(until_idle=True)
    info = queue.status(doomed)
    assert (info.status, info.attempts) == (TaskStatus.FAILED, 2)
    assert "Connection reset" in (info.error or "")


def test_a_hung_parse_in_process_is_timed_out_and_retried_and_the_worker_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mineru.parser.mineru_parser as mineru_parser

    real = mineru_parser.doc_analyze
    release = threading.Event()
    hung: list[str] = []

    def hangs_once(*args: Any, **kwargs: Any) -> Any:
        if not hung:  # inside MinerU's call: the first parse never returns until released
            hung.append(threading.current_thread().name)
            release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(mineru_parser, "doc_analyze", hangs_once)
    q = TaskQueue(tmp_path / "tasks.db", backend="flash", device="cpu", task_timeout=1.5, retry_backoff=0.05)
    try:
        stuck = q.submit(PDF, name="stuck.pdf")
        after = q.submit(PDF, name="after.pdf")
        with pytest.raises(mv.ParseTimeoutError, match=r"stuck\.pdf: no result after task_timeout=1\.5s") as hung_error:
            q.run(until_idle=True)
        assert hung_error.value.task_id == stuck
        info = q.status(stuck)
        assert (info.status, info.attempts, info.error_type) == (TaskStatus.PENDING, 1, "ParseTimeoutError")
        assert "task_timeout=1.5s" in (info.error or "")
        assert q.status(after).status is TaskStatus.PENDING  # this worker stopped; the next one takes it
        release.set()  # the abandoned parse ends; its session closes behind it
        assert wait_for(lambda: not any(t.name == hung[0] for t in threading.enumerate()), 60)
        with TaskQueue(q.path, task_timeout=600) as restarted:  # the next worker, as a supervisor starts it
            stats = restarted.run(until_idle=True)
        assert stats.completed == 2
        assert (q.status(stuck).status, q.status(stuck).attempts) == (TaskStatus.COMPLETED, 2)
        assert [e["event"] for e in q.events(stuck)] == ["submitted", "claimed", "retry", "claimed", "completed"]
    finally:
        release.set()
        q.close()


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.slow
def test_a_hung_isolated_parse_is_killed_and_the_worker_goes_on(tmp_path: Path) -> None:
    # The bound must pass a cold worker's first parse (seconds on a busy CPU) and still end the test soon.
    q = TaskQueue(
        tmp_path / "tasks.db", backend="flash", device="cpu", isolation="process", task_timeout=30, retry_backoff=0.05
    )
    before = _descendants()
    worker = threading.Thread(target=q.run, kwargs={"poll_interval": 0.05})
    worker.start()
    try:
        warm = q.submit(PDF, name="warm.pdf")
        q.result(warm, timeout=300)  # the isolated worker is up and idle now
        frozen = _descendants() - before
        assert frozen, "no worker process was started"
        for pid in frozen:  # a real hang: the worker process stops answering
            os.kill(pid, signal.SIGSTOP)
        stuck = q.submit(PDF, name="stuck.pdf")
        after = q.submit(PDF, name="after.pdf")
        assert q.result(after, timeout=300).document == "after.pdf"
        assert q.result(stuck, timeout=300).document == "stuck.pdf"
    finally:
        q.close()  # stops the loop and waits for it
        worker.join(60)
        for pid in _descendants():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert not worker.is_alive()
    with TaskQueue(tmp_path / "tasks.db") as reader:  # the worker's handle is closed
        info = reader.status(stuck)
        assert (info.status, info.attempts) == (TaskStatus.COMPLETED, 2)
        retry = [e["detail"] for e in reader.events(stuck) if e["event"] == "retry"]
        assert len(retry) == 1
        assert retry[0].startswith("ParseTimeoutError: stuck.pdf: no result after 30")
        assert "task_timeout=30s" in retry[0]
        assert reader.status(after).attempts == 1
    assert all_gone(list(frozen), 30)  # the hung worker was killed, not left behind


def test_async_worker_and_result(queue: TaskQueue) -> None:
    async def main() -> tuple[list[str], Any]:
        ids = [queue.submit(PDF, name=f"a-{i}.pdf") for i in range(3)]
        worker = asyncio.ensure_future(queue.arun())
        results = await asyncio.gather(*(queue.aresult(t, timeout=120) for t in ids))
        worker.cancel()  # stops the loop after its current task
        with pytest.raises(asyncio.CancelledError):
            await worker
        return [r.document for r in results], queue.counts()

    names, counts = asyncio.run(main())
    assert names == ["a-0.pdf", "a-1.pdf", "a-2.pdf"]
    assert counts[TaskStatus.COMPLETED] == 3


# --- several processes ----------------------------------------------------------------------

_SUBMITTER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from mineru_vram._queue import TaskQueue
    from mineru_vram.testing import make_pdf

    db, go, who, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    pdf = make_pdf(1)
    q = TaskQueue(db)
    while not go.exists():
        time.sleep(0.005)
    ids = [q.submit(pdf, name=f"{who}-{i}.pdf") for i in range(n)]
    q.close()
    print(json.dumps(ids))
    """
)


def test_concurrent_submitters_from_several_processes(tmp_path: Path) -> None:
    db, go = tmp_path / "tasks.db", tmp_path / "go"
    q = TaskQueue(db, backend="flash", device="cpu")
    worker = threading.Thread(target=q.run, kwargs={"poll_interval": 0.05})
    worker.start()
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _SUBMITTER, str(db), str(go), f"p{k}", "15"], stdout=subprocess.PIPE, text=True
            )
            for k in range(3)
        ]
        time.sleep(0.5)
        go.touch()  # all three submit at once, while the worker claims
        ids: list[str] = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            ids += json.loads(out)
        assert len(ids) == len(set(ids)) == 45
        results = {q.result(t, timeout=120).document for t in ids}
        completed = _completed_events(q)
    finally:
        q.close()  # stops the loop and waits for it to return
    assert not worker.is_alive()
    assert results == {f"p{k}-{i}.pdf" for k in range(3) for i in range(15)}
    assert completed == collections.Counter(dict.fromkeys(ids, 1))


def test_kill_9_of_the_worker_mid_task_then_restart_completes_everything_once(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    # Created as a pipeline queue with a long lease: the worker below overrides the backend by
    # flag, and the dead worker's task must come back without waiting ten minutes for its lease.
    q = TaskQueue(db, backend="pipeline", device="cpu", lease_seconds=600, retry_backoff=0.05)
    victim = q.submit(make_pdf(12), name="victim.pdf", priority=10)
    others = [q.submit(PDF, name=f"small-{i}.pdf") for i in range(5)]
    log = tmp_path / "workers.log"

    first = _start_worker(db, log, "--backend", "flash", "--device", "cpu")
    try:
        assert wait_for(lambda: q.status(victim).status is TaskStatus.PROCESSING, 120), "the victim was never claimed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _kill_group(first)
    assert first.returncode == -signal.SIGKILL
    info = q.status(victim)
    assert info.status is TaskStatus.PROCESSING, "the worker finished before it was killed"
    assert "completed" not in [e["event"] for e in q.events(victim)]

    second = _start_worker(db, log, "--backend", "flash", "--device", "cpu", "--until-idle")
    try:
        assert second.wait(timeout=180) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        _kill_group(second)

    info = q.status(victim)
    assert (info.status, info.attempts) == (TaskStatus.COMPLETED, 2)
    events = [(e["event"], e["detail"]) for e in q.events(victim)]
    assert [name for name, _ in events] == ["submitted", "claimed", "recovered", "claimed", "completed"]
    assert events[2][1] == "its worker died"  # found by its lock, long before its lease ran out
    for task_id in others:
        assert q.status(task_id).status is TaskStatus.COMPLETED
        assert q.status(task_id).attempts == 1
    assert _completed_events(q) == collections.Counter(dict.fromkeys([victim, *others], 1))
    assert q.result(victim).page_count == 12
    assert _leftovers(q) == {"inputs": [], "work": []}
    assert len(os.listdir(q.storage / "results")) == 6
    assert os.listdir(q.storage / "workers") == []  # the dead worker's lock file was cleaned up too
    q.close()


_CLAIMANT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mineru_vram import TaskQueue
    from mineru_vram._files import OwnerLock
    from mineru_vram._queue.worker import new_owner

    q = TaskQueue(sys.argv[1])
    owner = new_owner()
    with OwnerLock(q.storage / "workers" / f"{owner}.lock"):
        claim = q._store.claim(owner)
        print(claim.id, flush=True)
        time.sleep(600)
    """
)


def test_a_task_whose_worker_dies_on_its_last_attempt_fails_with_the_reason(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    with TaskQueue(db, backend="flash", device="cpu", max_attempts=1) as q:
        task_id = q.submit(PDF, name="poison.pdf")
        claimant = subprocess.Popen([sys.executable, "-c", _CLAIMANT, str(db)], stdout=subprocess.PIPE, text=True)
        try:
            assert claimant.stdout is not None
            assert claimant.stdout.readline().strip() == task_id
            assert q.recover() == 0  # its worker is alive: nothing to recover
            assert q.status(task_id).status is TaskStatus.PROCESSING
        finally:
            claimant.kill()
            claimant.communicate(timeout=30)
        assert q.recover() == 1
        info = q.status(task_id)
        assert info.status is TaskStatus.FAILED
        assert info.error_type == "WorkerLost"
        assert info.error == "its worker died during attempt 1 of 1"
        assert os.listdir(q.storage / "inputs") == []


def test_a_worker_that_lost_its_lease_cannot_complete_the_task(tmp_path: Path) -> None:
    """Exactly once: a late finisher's result is discarded once the task was given to another."""
    with TaskQueue(tmp_path / "tasks.db", backend="flash", device="cpu", lease_seconds=0.2, retry_backoff=0.01) as q:
        task_id = q.submit(PDF, name="slow.pdf")
        (slow, slow_lock), (fast, fast_lock) = _lock(q), _lock(q)
        with slow_lock, fast_lock:
            late = q._store.claim(slow)  # alive (its lock is held) but it stops renewing its lease
            assert late is not None
            time.sleep(0.3)
            assert q.recover() == 1
            assert q.status(task_id).error == "its worker stopped renewing the lease during attempt 1"
            time.sleep(0.05)  # the retry's backoff
            again = q._store.claim(fast)
            assert again is not None
            assert (again.id, again.attempt) == (task_id, 2)
            worker = Worker(q._store, q._files, q.settings, make_session=q._make_session, budget=None)
            with mv.ModelSession("flash", device="cpu", trust_env=False) as session:
                assert worker._process(session, again) == "completed"
                assert worker._process(session, late) == "lost"
        assert q.result(task_id).document == "slow.pdf"
        events = [e["event"] for e in q.events(task_id)]
        assert events == ["submitted", "claimed", "recovered", "claimed", "completed", "lease_lost"]
        assert os.listdir(q.storage / "results") == [q._files.result_name(again)]
        assert os.listdir(q.storage / "work") == []


# --- settings and the command line ------------------------------------------------------------


def test_settings_are_stored_in_the_queue_file_and_overridable(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    with TaskQueue(db, backend="flash", device="cpu", max_attempts=5, budget="6GiB") as creator:
        assert creator.settings.max_attempts == 5
    with TaskQueue(db) as opener:  # another process, later: the creator's settings
        s = opener.settings
        assert (s.backend, s.device, s.max_attempts) == ("flash", "cpu", 5)
        budget = s.vram_budget()
        assert budget is not None
        assert budget.mib == 6144
    with TaskQueue(db, max_attempts=2) as override:
        assert override.settings.max_attempts == 2
    with TaskQueue(db) as again:
        assert again.settings.max_attempts == 5  # overrides are not written back
    assert again.settings.task_timeout == 3600  # every attempt is bounded unless told otherwise
    with pytest.raises(mv.ConfigurationError, match="task_timeout=0"):
        TaskQueue(db, task_timeout=0)
    with pytest.raises(mv.ConfigurationError, match="VLM engine"):
        TaskQueue(db, backend="vlm")


def test_worker_cli_runs_until_idle_with_flag_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "tasks.db"
    with TaskQueue(db, backend="pipeline", device="cpu") as q:
        ids = [q.submit(PDF, name=f"cli-{i}.pdf") for i in range(2)]
    code = run_worker_cli([str(db), "--backend", "flash", "--until-idle", "--delete-results"])
    assert code == 0
    assert "2 completed, 0 failed" in capsys.readouterr().err
    with TaskQueue(db) as q:
        assert [q.status(t).status for t in ids] == [TaskStatus.COMPLETED] * 2
        assert q.settings.backend == "pipeline"
    assert run_worker_cli([str(db), "--budget", "lots"]) == 2  # bad configuration, as cli.md says
    assert "budget 'lots'" in capsys.readouterr().err


def _damaged_page(pdf: bytes) -> bytes:
    """``pdf`` with its second page's content stream declared compressed while it is not."""
    return pdf.replace(b"7 0 obj\n<< /Length", b"7 0 obj\n<< /Filter /FlateDecode /Length", 1)


def _missing_page_content(pdf: bytes) -> bytes:
    """``pdf`` with its first page's content pointing at an object that does not exist."""
    return pdf.replace(b"/Contents 5 0 R", b"/Contents 99 0 R", 1)


def _on_a_small_disk(limit: int, argv: list[str]) -> list[str]:
    """``argv``, run where no file may grow past ``limit`` bytes: for it, the disk is full.

    ``RLIMIT_FSIZE`` and an ignored ``SIGXFSZ`` (so a write past the limit fails with
    ``EFBIG`` instead of killing the process) both survive the ``exec``.
    """
    prelude = (
        "import os, resource, signal, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", prelude, *argv]


def test_the_worker_command_keeps_serving_through_storage_and_document_failures_and_exits_1(
    tmp_path: Path,
) -> None:
    db = tmp_path / "tasks.db"
    odd_name = tmp_path / os.fsdecode(b"caf\xe9-latin1.pdf")  # a file name that is not UTF-8
    odd_name.write_bytes(PDF)
    with TaskQueue(db, backend="flash", device="cpu", retry_backoff=0.05) as q:
        big = q.submit(make_pdf(30), name="big.pdf", max_attempts=1)  # its result is over 1 MiB
        damaged = q.submit(_damaged_page(make_pdf(3)), name="damaged-page.pdf")
        missing = q.submit(_missing_page_content(make_pdf(2)), name="missing-content.pdf")
        odd = q.submit(odd_name)
        small = q.submit(PDF, name="small.pdf")
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        worker = subprocess.Popen(
            _on_a_small_disk(1024 * 1024, [sys.executable, "-m", "mineru_vram", "worker", str(db), "--until-idle"]),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = worker.wait(timeout=600)
    finally:
        _kill_group(worker)
    output = log.read_text(errors="replace")
    assert code == 1, output[-3000:]  # a task failed
    assert "Traceback" not in output
    assert "4 completed, 1 failed" in output
    with TaskQueue(db) as q:
        info = q.status(big)
        assert (info.status, info.error_type) == (TaskStatus.FAILED, "QueueStorageError")
        assert "File too large" in (info.error or "")
        for task_id in (damaged, missing, odd, small):
            assert q.status(task_id).status is TaskStatus.COMPLETED, q.status(task_id)
        assert q.status(odd).name == str(tmp_path / "caf\\xe9-latin1.pdf")
        assert q.result(odd).document == q.status(odd).name
        assert q.result(damaged).page_count == 3
        assert os.listdir(q.storage / "work") == []


def test_worker_admission_timeout_is_a_clear_error_and_claims_nothing(tmp_path: Path) -> None:
    from mineru_vram._budget import VramBudget
    from mineru_vram._probe import DeviceMemory

    def busy_card(device: str) -> DeviceMemory:  # stand-in for NVML: a card someone else filled
        return DeviceMemory(index=0, name="Stand-in GPU", total_mib=16384, used_mib=15360, free_mib=1024)

    budget = VramBudget(4096, probe=busy_card, timeout=0.2, poll_interval=0.05)
    with TaskQueue(tmp_path / "tasks.db", backend="flash", device="cuda:0", budget=budget) as q:
        task_id = q.submit(PDF)
        with pytest.raises(mv.AdmissionTimeoutError, match="did not have 4096 MiB free"):
            q.run(until_idle=True)
        assert q.status(task_id).status is TaskStatus.PENDING
        assert q.status(task_id).attempts == 0


def test_more_sessions_only_when_the_budget_allows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """concurrency=3 on a card with room for two budgets: two isolated sessions parse, the third never opens."""
    from mineru_vram._budget import Ledger, VramBudget, device_key
    from mineru_vram._probe import DeviceMemory

    runtime = tmp_path / "runtime"
    monkeypatch.setenv("MINERU_VRAM_RUNTIME_DIR", str(runtime))

    def card(device: str) -> DeviceMemory:  # stand-in for NVML: 14 GiB free, per-process figures hidden
        return DeviceMemory(index=0, name="Stand-in GPU", total_mib=16384, used_mib=2048, free_mib=14336)

    budget = VramBudget(6144, probe=card, timeout=5, poll_interval=0.05)
    with TaskQueue(
        tmp_path / "tasks.db", backend="flash", device="cuda:0", isolation="process", concurrency=3, budget=budget
    ) as q:
        ids = [q.submit(PDF, name=f"par-{i}.pdf") for i in range(8)]
        seen: list[int] = []

        def watch() -> None:  # the ledger while the worker runs: one reservation per open session
            while not stop_watch.is_set():
                seen.append(len(Ledger(runtime).snapshot(device_key("cuda:0"))))
                time.sleep(0.05)

        stop_watch = threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            stats = q.run(until_idle=True)
        finally:
            stop_watch.set()
            watcher.join()
        assert stats.sessions == 2
        assert stats.completed == 8
        assert max(seen) == 2
        assert [q.status(t).status for t in ids] == [TaskStatus.COMPLETED] * 8
    assert Ledger(runtime).snapshot(device_key("cuda:0")) == []  # released with the sessions
