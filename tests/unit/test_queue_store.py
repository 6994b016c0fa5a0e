"""The queue's SQL on its own: real SQLite, real lock files, real processes; no session, no MinerU."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from mineru_vram import TaskNotFoundError, TaskStatus
from mineru_vram._files import OwnerLock
from mineru_vram._queue.files import Storage
from mineru_vram._queue.records import QueueSettings
from mineru_vram._queue.store import LeasePolicy, QueueStore
from mineru_vram._queue.worker import RENEW_GRACE_SECONDS, Worker, new_owner


def _store(tmp_path: Path, **policy: float) -> QueueStore:
    storage = Storage(tmp_path / "tasks.db.files")
    storage.create()
    store = QueueStore(tmp_path / "tasks.db", storage, policy=LeasePolicy(**policy), durable=False)
    store.init({})
    return store


def _add(store: QueueStore, name: str, *, priority: int = 0, max_attempts: int = 3) -> str:
    task_id = uuid.uuid4().hex
    store.storage.write_input(task_id, b"%PDF-1.4 stand-in bytes", sync=False)
    store.add(task_id, name, {}, priority=priority, size=23, max_attempts=max_attempts)
    return task_id


def _worker(store: QueueStore) -> tuple[str, OwnerLock]:
    owner = new_owner()
    return owner, OwnerLock(store.storage.lock_path(owner)).acquire()


def _events(store: QueueStore, task_id: str) -> list[str]:
    return [e["event"] for e in store.events(task_id)]


def test_claims_go_by_priority_then_submission_order_and_each_task_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    low = [_add(store, f"low-{i}") for i in range(3)]
    high = _add(store, "high", priority=5)
    owner, lock = _worker(store)
    try:
        claims = [store.claim(owner) for _ in range(4)]
        assert store.claim(owner) is None  # nothing left
    finally:
        lock.release()
    assert [c.id for c in claims if c is not None] == [high, *low]
    assert len({c.token for c in claims if c is not None}) == 4  # a fresh token per claim
    info = store.info(high)
    assert (info.status, info.attempts, info.worker) == (TaskStatus.PROCESSING, 1, owner)
    assert _events(store, high) == ["submitted", "claimed"]
    with pytest.raises(TaskNotFoundError):
        store.info("0" * 32)


def test_a_live_worker_keeps_its_task_and_an_expired_lease_is_recovered(tmp_path: Path) -> None:
    store = _store(tmp_path, lease_seconds=0.3, retry_backoff=0.01)
    task_id = _add(store, "doc.pdf")
    owner, lock = _worker(store)
    try:
        claim = store.claim(owner)
        assert claim is not None
        for _ in range(3):  # renewed: the lease never runs out
            time.sleep(0.15)
            store.renew([claim])
            assert store.recover() == 0
        time.sleep(0.4)  # not renewed any more: the live owner loses it anyway
        assert store.recover() == 1
    finally:
        lock.release()
    info = store.info(task_id)
    assert info.status is TaskStatus.PENDING
    assert (info.error, info.error_type) == ("its worker stopped renewing the lease during attempt 1", "WorkerLost")
    assert info.not_before > 0
    assert _events(store, task_id) == ["submitted", "claimed", "recovered"]


def test_an_attempt_past_its_bound_stops_being_renewed_and_is_recovered_naming_the_bound(tmp_path: Path) -> None:
    store = _store(tmp_path, lease_seconds=0.2, retry_backoff=0.01, task_timeout=0.1)
    task_id = _add(store, "hangs.pdf")
    settings = QueueSettings(task_timeout=0.1, lease_seconds=0.2)

    def no_session(budget: object) -> Any:
        raise AssertionError("no session is needed here")

    worker = Worker(store, store.storage, settings, make_session=no_session, budget=None)
    owner, lock = _worker(store)
    try:
        claim = store.claim(owner)
        assert claim is not None
        assert worker.renewable(claim, claim.started + 0.05)
        assert worker.renewable(claim, claim.started + 0.1 + RENEW_GRACE_SECONDS)
        assert not worker.renewable(claim, claim.started + 0.1 + RENEW_GRACE_SECONDS + 1)
        time.sleep(0.3)  # its worker lives but no longer renews the lease
        assert store.recover() == 1
    finally:
        lock.release()
    info = store.info(task_id)
    assert info.error == "it ran past task_timeout=0.1s (its worker stopped renewing the lease) during attempt 1"


def test_a_dead_workers_task_is_recovered_at_once_by_its_lock(tmp_path: Path) -> None:
    store = _store(tmp_path, lease_seconds=600)
    task_id = _add(store, "doc.pdf", max_attempts=1)
    owner, lock = _worker(store)
    claim = store.claim(owner)
    assert claim is not None
    assert store.recover() == 0  # alive, and the lease is long
    lock.release(remove=False)  # what the kernel does when the owner dies: the lock drops, the file stays
    assert store.recover() == 1
    info = store.info(task_id)
    assert info.status is TaskStatus.FAILED  # its only attempt
    assert info.error == "its worker died during attempt 1 of 1"
    assert not store.storage.lock_path(owner).exists()  # the dead owner's lock file went with it
    assert not store.storage.input_path(task_id).exists()  # an ended task keeps no input


def test_completion_after_the_lease_was_lost_does_not_count(tmp_path: Path) -> None:
    store = _store(tmp_path, lease_seconds=0.2, retry_backoff=0.01)
    task_id = _add(store, "doc.pdf")
    (slow, slow_lock), (fast, fast_lock) = _worker(store), _worker(store)
    try:
        late = store.claim(slow)
        assert late is not None
        time.sleep(0.3)
        assert store.recover() == 1  # the slow worker lives, but stopped renewing its lease
        time.sleep(0.05)  # the retry's backoff
        again = store.claim(fast)
        assert again is not None
        assert (again.id, again.attempt) == (task_id, 2)
        assert store.complete(late, "late.result") is False
        assert store.fail(late, "too late", "RuntimeError", retryable=True) == "lost"
        assert store.complete(again, "fast.result") is True
        assert store.complete(again, "twice.result") is False  # exactly once, even for the winner
    finally:
        slow_lock.release()
        fast_lock.release()
    assert store.result_name(task_id) == "fast.result"
    assert store.info(task_id).status is TaskStatus.COMPLETED
    assert _events(store, task_id) == [
        "submitted", "claimed", "recovered", "claimed", "lease_lost", "lease_lost", "completed", "lease_lost",
    ]  # fmt: skip


def test_failures_back_off_and_end_failed_after_the_last_attempt(tmp_path: Path) -> None:
    store = _store(tmp_path, retry_backoff=0.05)
    flaky = _add(store, "flaky.pdf", max_attempts=2)
    broken = _add(store, "broken.pdf")
    owner, lock = _worker(store)
    try:
        first = store.claim(owner)
        assert first is not None
        assert first.id == flaky
        assert store.fail(first, "pipe broke", "ConnectionResetError", retryable=True) == "retried"
        info = store.info(flaky)
        assert info.status is TaskStatus.PENDING
        assert info.not_before >= first.started + 0.05
        nxt = store.claim(owner)  # the flaky one waits out its backoff: the other comes first
        assert nxt is not None
        assert nxt.id == broken
        assert store.fail(nxt, "not a pdf", "NotAPdfError", retryable=False) == "failed"
        time.sleep(0.06)
        second = store.claim(owner)
        assert second is not None
        assert (second.id, second.attempt) == (flaky, 2)
        assert store.fail(second, "pipe broke again", "ConnectionResetError", retryable=True) == "failed"
    finally:
        lock.release()
    assert store.info(broken).attempts == 1  # the document's fault: never retried
    assert (store.info(flaky).status, store.info(flaky).error) == (TaskStatus.FAILED, "pipe broke again")
    assert os.listdir(store.storage.inputs) == []
    assert store.counts()[TaskStatus.FAILED] == 2


def test_give_back_and_cancel(tmp_path: Path) -> None:
    store = _store(tmp_path)
    task_id = _add(store, "doc.pdf")
    other = _add(store, "other.pdf")
    owner, lock = _worker(store)
    try:
        claim = store.claim(owner)
        assert claim is not None
        store.give_back(claim)  # the worker stops: pending again, the attempt not counted
        assert (store.info(task_id).status, store.info(task_id).attempts) == (TaskStatus.PENDING, 0)
        assert store.cancel(other)
        assert not store.cancel(other)
        assert store.forget(other) == (True, None)
        with pytest.raises(TaskNotFoundError):
            store.cancel(other)
        assert store.forget(task_id) == (False, None)  # pending: kept
    finally:
        lock.release()
    assert _events(store, task_id) == ["submitted", "claimed", "released"]


def test_sweep_deletes_only_files_no_row_explains(tmp_path: Path) -> None:
    store = _store(tmp_path)
    storage = store.storage
    pending = _add(store, "pending.pdf")
    owner, lock = _worker(store)
    try:
        running = _add(store, "running.pdf")
        store.cancel(pending)
        store.storage.write_input(pending, b"leftover", sync=False)  # a crash left the input of an ended task
        claim = store.claim(owner)
        assert claim is not None
        assert claim.id == running
        live = storage.staging_path(claim)
        live.write_bytes(b"being written")
        stale = storage.work / f"{uuid.uuid4().hex}-{uuid.uuid4().hex}.result"
        stale.write_bytes(b"an attempt that ended")
        old_orphan = storage.results / f"{uuid.uuid4().hex}-{uuid.uuid4().hex}.result"
        old_orphan.write_bytes(b"no row")
        os.utime(old_orphan, (time.time() - 3600, time.time() - 3600))
        young_orphan = storage.results / f"{uuid.uuid4().hex}-{uuid.uuid4().hex}.result"
        young_orphan.write_bytes(b"a completion about to commit")
        store.sweep()
    finally:
        lock.release()
    assert sorted(os.listdir(storage.inputs)) == [f"{running}.pdf"]
    assert os.listdir(storage.work) == [live.name]
    assert os.listdir(storage.results) == [young_orphan.name]


_IDLE_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mineru_vram._files import OwnerLock
    from mineru_vram._queue.worker import new_owner

    folder = Path(sys.argv[1])
    owner = new_owner()
    with OwnerLock(folder / f"{owner}.lock"):
        print(owner, flush=True)
        time.sleep(600)
    """
)


def test_lock_files_of_workers_that_died_idle_are_swept_at_the_next_start(tmp_path: Path) -> None:
    store = _store(tmp_path)
    workers = store.storage.workers
    idle = subprocess.Popen([sys.executable, "-c", _IDLE_WORKER, str(workers)], stdout=subprocess.PIPE, text=True)
    busy = subprocess.Popen([sys.executable, "-c", _IDLE_WORKER, str(workers)], stdout=subprocess.PIPE, text=True)
    assert idle.stdout is not None
    assert busy.stdout is not None
    dead_idle, live = idle.stdout.readline().strip(), busy.stdout.readline().strip()
    old_tmp = workers / ".tmp-crashed-before-rename"
    old_tmp.write_bytes(b"")
    os.utime(old_tmp, (time.time() - 3600, time.time() - 3600))
    young_tmp = workers / ".tmp-being-created"
    young_tmp.write_bytes(b"")
    idle.kill()  # SIGKILL: no chance to remove its file
    idle.communicate(timeout=30)
    assert (workers / f"{dead_idle}.lock").exists()
    mine, my_lock = _worker(store)
    try:
        store.recover()
        store.sweep()  # what every worker does when it starts
        assert sorted(os.listdir(workers)) == sorted(
            [f"{live}.lock", f"{mine}.lock", young_tmp.name]
        )  # the dead one's file is gone; the live ones and a file being created stay
    finally:
        my_lock.release()
        busy.kill()
        busy.communicate(timeout=30)


_CLAIMER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from mineru_vram._files import OwnerLock
    from mineru_vram._queue.files import Storage
    from mineru_vram._queue.store import QueueStore
    from mineru_vram._queue.worker import new_owner

    db, go = Path(sys.argv[1]), Path(sys.argv[2])
    storage = Storage(db.with_name(db.name + ".files"))
    store = QueueStore(db, storage, durable=False)
    owner = new_owner()
    done = []
    with OwnerLock(storage.lock_path(owner)):
        while not go.exists():
            time.sleep(0.005)
        while (claim := store.claim(owner)) is not None:
            assert store.complete(claim, claim.id + ".result")
            done.append(claim.id)
    print(json.dumps(done))
    """
)


def test_exactly_once_under_concurrent_claimers_in_processes_and_threads(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ids = [_add(store, f"doc-{i}.pdf") for i in range(240)]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _CLAIMER, str(store.path), str(go)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    done: list[str] = []
    lock = threading.Lock()

    def claim_here() -> None:  # one connection per thread, one owner per thread
        owner, owner_lock = _worker(store)
        mine = []
        try:
            while (claim := store.claim(owner)) is not None:
                assert store.complete(claim, claim.id + ".result")
                mine.append(claim.id)
        finally:
            owner_lock.release()
            store.drop_thread_connection()
        with lock:
            done.extend(mine)

    threads = [threading.Thread(target=claim_here) for _ in range(2)]
    go.touch()
    for t in threads:
        t.start()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        done.extend(json.loads(out))
    for t in threads:
        t.join(120)
    assert collections.Counter(done) == collections.Counter(dict.fromkeys(ids, 1))
    completed = collections.Counter(e["task_id"] for e in store.events() if e["event"] == "completed")
    claimed = collections.Counter(e["task_id"] for e in store.events() if e["event"] == "claimed")
    assert completed == claimed == collections.Counter(dict.fromkeys(ids, 1))
    assert store.counts()[TaskStatus.COMPLETED] == 240
