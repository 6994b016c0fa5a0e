"""The queue's typed errors for what a machine does to it: size, full disks, garbage, read-only paths, odd names.

No MinerU: nothing here parses. Disk full is real: a child process whose files may not
grow past a limit (``RLIMIT_FSIZE``), which the kernel enforces like a full disk.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram import TaskQueue, TaskStatus
from mineru_vram._cli import run_worker_cli
from support import as_nobody, needs_root, shared_tmp

__all__ = ["shared_tmp"]  # a fixture, used by name

PDF = b"%PDF-1.4\n% a stand-in: these tests never parse\n%%EOF\n"


def test_submit_refuses_a_document_over_the_limit_before_reading_it(tmp_path: Path) -> None:
    sparse = tmp_path / "huge.pdf"
    with open(sparse, "wb") as fh:
        fh.truncate(2 * 1024**3)  # 2 GiB that take no disk, and would take 2 GiB of memory if read
    with TaskQueue(tmp_path / "tasks.db", backend="flash") as q:
        assert q.settings.max_document_bytes == 512 * 1024 * 1024
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(mv.DocumentTooLargeError, match=r"2147483648 bytes exceeds the queue's max_document_bytes"):
            q.submit(sparse)
        grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        assert grew_kib < 256 * 1024, f"submit read the file: peak RSS grew by {grew_kib} KiB"
        assert q.tasks() == []
        assert os.listdir(q.storage / "inputs") == []

    with TaskQueue(tmp_path / "small.db", backend="flash", max_document_bytes=1000) as q:
        with pytest.raises(mv.DocumentTooLargeError) as too_big:
            q.submit(b"%PDF-" + b"x" * 1000, name="bytes.pdf")
        assert (too_big.value.size, too_big.value.limit, too_big.value.document) == (1005, 1000, "bytes.pdf")
        stream = io.BytesIO(b"%PDF-" + b"x" * 5000)
        with pytest.raises(mv.DocumentTooLargeError):
            q.submit(stream, name="stream.pdf")
        assert stream.tell() == 1001  # read one byte past the limit, no further
        assert q.settings.max_document_bytes == 1000
        q.submit(PDF, name="fits.pdf")
        assert [t.name for t in q.tasks()] == ["fits.pdf"]


def test_a_file_name_that_is_not_utf8_is_kept_with_its_bytes_escaped(tmp_path: Path) -> None:
    odd = tmp_path / os.fsdecode(b"r\xe9sum\xe9.pdf")  # Latin-1 on disk
    odd.write_bytes(PDF)
    with TaskQueue(tmp_path / "tasks.db", backend="flash") as q:
        task_id = q.submit(odd)
        assert q.status(task_id).name == str(tmp_path / "r\\xe9sum\\xe9.pdf")
        assert q.submit(PDF, name=os.fsdecode(b"\xff.pdf")) != task_id
        assert [t.name for t in q.tasks()][1] == "\\xff.pdf"


def test_a_garbage_database_is_a_typed_error_and_the_worker_command_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "tasks.db"
    db.write_bytes(os.urandom(64 * 1024))
    db.chmod(0o600)
    with pytest.raises(mv.QueueStorageError, match="not a database") as garbage:
        TaskQueue(db)
    assert garbage.value.path == str(db)
    assert isinstance(garbage.value, OSError)
    assert run_worker_cli([str(db), "--until-idle"]) == 1
    err = capsys.readouterr().err
    assert f"mineru-vram worker: {db}: cannot open the task queue: file is not a database" in err
    assert "Traceback" not in err


_SUBMITTER = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from mineru_vram import QueueStorageError, TaskQueue

    db, limit = sys.argv[1], int(sys.argv[2])
    q = TaskQueue(db, durable=False)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
    out = {}
    try:
        q.submit(b"%PDF-" + b"x" * (2 * limit), name="big.pdf")
    except QueueStorageError as exc:
        out["error"] = [type(exc).__name__, str(exc), exc.path]
    out["small"] = q.submit(b"%PDF-1.4 small", name="small.pdf")
    out["inputs"] = sorted(os.listdir(q.storage / "inputs"))
    q.close()
    print(json.dumps(out))
    """
)


def test_a_full_disk_at_submit_is_a_typed_error_that_leaves_nothing_behind(tmp_path: Path) -> None:
    db = tmp_path / "tasks.db"
    with TaskQueue(db, backend="flash"):
        pass
    limit = 512 * 1024
    run = subprocess.run(
        [sys.executable, "-c", _SUBMITTER, str(db), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    kind, message, path = out["error"]
    assert kind == "QueueStorageError"
    assert "cannot write: File too large" in message
    assert path.startswith(str(db) + ".files/inputs/")
    assert out["inputs"] == [f"{out['small']}.pdf"]  # the failed copy left no temporary behind
    with TaskQueue(db) as q:
        assert [t.name for t in q.tasks()] == ["small.pdf"]
        assert q.status(out["small"]).status is TaskStatus.PENDING


def _python_for_nobody() -> list[str]:
    """A Python the user ``nobody`` can run, importing this checkout and the test environment's packages."""
    system = Path("/usr/bin/python3")
    if not system.exists():
        pytest.skip("no /usr/bin/python3 for a second user")
    version = subprocess.run(
        [str(system), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"/usr/bin/python3 is {version}, not this Python: it cannot load this environment's packages")
    src = str(Path(mv.__file__).resolve().parents[1])
    return ["env", f"PYTHONPATH={src}:{sysconfig.get_paths()['purelib']}", str(system)]


@needs_root
def test_a_folder_the_user_cannot_write_is_a_typed_error(shared_tmp: Path) -> None:
    folder = shared_tmp / "read-only"
    folder.mkdir(mode=0o755)  # nobody may enter it, not write to it
    code = (
        "import sys, mineru_vram as mv\n"
        "try:\n"
        "    mv.TaskQueue(sys.argv[1])\n"
        "except mv.QueueStorageError as exc:\n"
        "    print('typed:', exc)\n"
    )
    run = as_nobody([*_python_for_nobody(), "-c", code, str(folder / "tasks.db")])
    assert run.stdout.startswith(f"typed: {folder}/tasks.db.files: cannot create the queue's folder: "), run
    assert "Permission denied" in run.stdout
    assert not (folder / "tasks.db.files").exists()
