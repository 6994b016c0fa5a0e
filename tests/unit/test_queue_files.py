"""The queue's files against another local user: nothing adopted, nothing readable, nothing that runs code.

The attacks run as the user ``nobody`` (``support.as_nobody``) in a shared sticky
folder like ``/tmp``; the queue runs as this test's user. No MinerU: a worker's
completion is recorded by the worker's own code from a result built here.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram import ParseResult, TaskQueue, TaskStatus
from mineru_vram._files import OwnerLock
from mineru_vram._queue.results import MAGIC, decode_result, encode_result
from mineru_vram._queue.worker import Worker, new_owner
from support import as_nobody, needs_root, shared_tmp

__all__ = ["shared_tmp"]  # a fixture, used by name

PDF = b"%PDF-1.4\n% a stand-in: these tests never parse\n%%EOF\n"

RESULT = ParseResult(
    document="paper.pdf",
    markdown="# Title\n\n![](images/a.jpg)\n",
    content_list=[{"type": "text", "text": "é", "bbox": [1, 2.5, 3, 4]}, {"type": "image", "img_path": "images/a.jpg"}],
    middle_json={"pdf_info": [{"page_idx": 0, "para_blocks": []}], "_version_name": "4.0.12"},
    images={"images/a.jpg": b"\xff\xd8\xff\x00binary", "images/empty.png": b""},
    page_count=1,
    seconds=0.25,
    backend="pipeline",
    device="cpu",
    model_output=None,
    timings={"parse": 0.2},
)


class _Evil:
    """Unpickling this creates ``path``: proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (str(self.path), "w"))


def _completed(q: TaskQueue, result: ParseResult = RESULT) -> str:
    """Submit a task and record its completion the way a worker does (the parse is skipped)."""
    task_id = q.submit(PDF, name=result.document)
    owner = new_owner()
    with OwnerLock(q.storage / "workers" / f"{owner}.lock"):
        claim = q._store.claim(owner)
        assert claim is not None
        assert claim.id == task_id, "another task was pending"
        worker = Worker(q._store, q._files, q.settings, make_session=q._make_session, budget=None)
        assert worker._complete(claim, result) == "completed"
    return task_id


def _result_file(q: TaskQueue, task_id: str) -> Path:
    name = q._store.result_name(task_id)
    assert name is not None
    return q.storage / "results" / name


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_results_round_trip_and_every_folder_and_file_is_private(tmp_path: Path) -> None:
    with TaskQueue(tmp_path / "tasks.db", backend="flash") as q:
        task_id = _completed(q)
        pending = q.submit(PDF, name="waiting.pdf")
        assert q.result(task_id, timeout=0) == RESULT
        for folder in (q.storage, *(q.storage / sub for sub in ("inputs", "work", "results", "workers"))):
            assert _mode(folder) == 0o700, folder
        files = [q.path, _result_file(q, task_id), q.storage / "inputs" / f"{pending}.pdf"]
        files += [p for p in (Path(f"{q.path}-wal"), Path(f"{q.path}-shm")) if p.exists()]
        for path in files:
            assert _mode(path) == 0o600, path


def test_a_database_an_older_version_left_readable_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    with TaskQueue(db, backend="flash"):
        pass
    db.chmod(0o644)
    with TaskQueue(db):
        assert _mode(db) == 0o600


@needs_root
@pytest.mark.parametrize("mode", ["0777", "0700"])
def test_a_files_tree_another_user_made_first_is_refused_not_adopted(shared_tmp: Path, mode: str) -> None:
    tree = shared_tmp / "tasks.db.files"
    evil = shared_tmp / "evil.bin"
    marker = shared_tmp / "ran"
    evil.write_bytes(pickle.dumps(_Evil(marker)))
    evil.chmod(0o644)
    as_nobody(["mkdir", "-m", mode, str(tree), str(tree / "results"), str(tree / "inputs")])
    as_nobody(["cp", str(evil), str(tree / "results" / "planted.pickle")])
    with pytest.raises(mv.InsecurePathError, match="belongs to uid 65534") as refused:
        TaskQueue(shared_tmp / "tasks.db", backend="flash")
    assert refused.value.path == str(tree)
    assert not (shared_tmp / "tasks.db").exists()  # refused before the database was made
    assert not marker.exists()


def test_a_files_tree_others_can_write_is_refused_even_when_ours(tmp_path: Path) -> None:
    tree = tmp_path / "tasks.db.files"
    tree.mkdir()
    tree.chmod(0o777)
    with pytest.raises(mv.InsecurePathError, match="others can write"):
        TaskQueue(tmp_path / "tasks.db", backend="flash")


@needs_root
@pytest.mark.parametrize("planted", ["tasks.db", "tasks.db-wal"])
def test_a_database_or_journal_another_user_made_first_is_refused(shared_tmp: Path, planted: str) -> None:
    as_nobody(["sh", "-c", f"umask 0; : > {shared_tmp / planted}"])
    with pytest.raises(mv.InsecurePathError, match="belongs to uid 65534"):
        TaskQueue(shared_tmp / "tasks.db", backend="flash")


@needs_root
def test_another_user_can_neither_read_nor_plant_anything(shared_tmp: Path) -> None:
    with TaskQueue(shared_tmp / "tasks.db", backend="flash") as q:
        task_id = _completed(q)
        pending = q.submit(PDF, name="secret.pdf")  # stays pending: its input stays
        targets = [q.path, _result_file(q, task_id), q.storage / "inputs" / f"{pending}.pdf"]
        for path in targets:
            with pytest.raises(subprocess.CalledProcessError):
                as_nobody(["cat", str(path)])
        for folder in ("results", "inputs", "work", "workers"):
            with pytest.raises(subprocess.CalledProcessError):
                as_nobody(["sh", "-c", f": > {q.storage / folder / 'planted'}"])
        assert q.result(task_id) == RESULT


def test_a_result_path_that_leaves_the_queue_folder_is_never_followed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "evil.pickle").write_bytes(pickle.dumps(_Evil(marker)))
    with TaskQueue(tmp_path / "tasks.db", backend="flash") as q:
        task_id = _completed(q)
        with sqlite3.connect(q.path) as db:  # someone who can write the database
            db.execute("UPDATE tasks SET result_path = '../../evil.pickle' WHERE id = ?", (task_id,))
        db.close()
        with pytest.raises(mv.QueueStorageError, match=r"names '\.\./\.\./evil\.pickle' as a result file"):
            q.result(task_id, timeout=0)
        assert q.forget(task_id)  # and forgetting it deletes nothing outside the folder
    assert not marker.exists()
    assert (tmp_path / "evil.pickle").exists()


def test_a_swapped_result_file_is_a_typed_error_not_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with TaskQueue(tmp_path / "tasks.db", backend="flash") as q:
        task_id = _completed(q)
        stored = _result_file(q, task_id)
        stored.write_bytes(pickle.dumps(_Evil(marker)))
        with pytest.raises(mv.QueueStorageError, match="not a result this queue wrote") as swapped:
            q.result(task_id, timeout=0)
        assert isinstance(swapped.value, OSError)
        assert not marker.exists()
        stored.unlink()
        stored.symlink_to(tmp_path / "elsewhere")
        with pytest.raises(mv.InsecurePathError, match="symbolic link"):
            q.result(task_id, timeout=0)
        assert q.status(task_id).status is TaskStatus.COMPLETED


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda b: b[: len(b) // 2], "cut short"),
        (lambda b: b + b"x", "bytes after its last image"),
        (lambda b: b"garbage" + b, "result header"),
        (lambda b: MAGIC + (5).to_bytes(8, "big") + b"[1,2]", "has no result"),
        (lambda b: MAGIC + (9).to_bytes(8, "big") + b"[" * 5 + b"]" * 4, "not valid JSON"),
    ],
)
def test_a_damaged_result_is_refused_with_the_reason(damage: object, words: str) -> None:
    data = encode_result(RESULT)
    assert decode_result(data) == RESULT
    with pytest.raises(ValueError, match=words):
        decode_result(damage(data))  # type: ignore[operator]


def test_values_json_does_not_know_are_stored_as_plain_data() -> None:
    numpy = pytest.importorskip("numpy")
    odd = ParseResult(
        document="x.pdf",
        markdown="",
        content_list=[{"score": numpy.float32(0.5), "box": numpy.array([1, 2]), "pair": (1, 2)}],
        middle_json={},
    )
    back = decode_result(encode_result(odd))
    assert back.content_list == [{"score": 0.5, "box": [1, 2], "pair": [1, 2]}]
