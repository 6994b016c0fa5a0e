"""The process layer: groups that die with their parent, isolated Python children, locks, private files."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import mineru_vram as mv
from mineru_vram import _files, _process
from support import as_nobody, needs_root, shared_tmp, wait_for

__all__ = ["shared_tmp"]  # a fixture, used by name


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_spawn_logs_the_command_and_passes_its_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "cmd.log"
    group = _process.spawn(
        [sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"], env=dict(os.environ), log_path=log
    )
    assert group.wait(30) == 3
    assert "hello" in group.log_tail()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_kill_takes_the_whole_group_and_descendants(tmp_path: Path) -> None:
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    group = _process.spawn([sys.executable, "-c", code], env=dict(os.environ), log_path=tmp_path / "log")
    assert wait_for(lambda: len(group.pids()) == 3, timeout=20), group.pids()
    pids = group.pids()
    assert group.alive()
    code = group.kill()
    assert code == -signal.SIGKILL
    assert not group.alive()
    assert all(_gone(pid) for pid in pids)


def test_a_command_killed_by_a_signal_reads_as_killed_through_the_keeper(tmp_path: Path) -> None:
    group = _process.spawn(["sleep", "60"], env=dict(os.environ), log_path=tmp_path / "log")
    child = group.command_pid(timeout=20)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    code = group.wait(30)
    assert code == 128 + signal.SIGKILL, "the keeper reports a signal as the shell does"
    assert _process.command_exitcode(code) == -signal.SIGKILL
    assert _process.command_exitcode(group.kill()) == -signal.SIGKILL
    assert _process.command_exitcode(0) == 0
    assert _process.command_exitcode(127) == 127
    assert _process.command_exitcode(None) is None


def test_a_missing_command_is_exit_127_with_the_reason_in_the_log(tmp_path: Path) -> None:
    group = _process.spawn(["/nonexistent/server"], env=dict(os.environ), log_path=tmp_path / "log")
    assert group.wait(30) == 127
    assert "cannot start '/nonexistent/server'" in group.log_tail()


_PARENT = textwrap.dedent(
    """
    import os, sys, threading, time
    from mineru_vram import _files, _process

    out = sys.argv[1]
    box = []
    # Started from a thread that exits at once: PR_SET_PDEATHSIG fires on that thread's
    # exit, which must not kill the child while this process lives.
    t = threading.Thread(target=lambda: box.append(_process.spawn(
        ['sleep', '120'], env=dict(os.environ), log_path=None)))
    t.start(); t.join()
    group = box[0]
    child = group.command_pid(timeout=10)
    with open(out, 'w') as fh:
        fh.write('%d %d' % (group.pid, child))
    time.sleep(120)
    """
)


def test_children_die_with_their_parent_even_by_sigkill_but_not_with_the_starting_thread(tmp_path: Path) -> None:
    out = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(out)])
    try:
        assert wait_for(lambda: out.exists() and out.read_text().count(" ") == 1, timeout=30)
        keeper, child = (int(x) for x in out.read_text().split())
        time.sleep(1.0)  # well past the keeper's poll: the starting thread's exit did not kill it
        assert not _gone(keeper)
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_for(lambda: _gone(keeper) and _gone(child), timeout=5), "orphaned group survived its parent"
    finally:
        parent.kill()
        parent.wait(10)


def test_python_children_do_not_import_from_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "where_from.py").write_text(
        "import json, mineru_vram, pathlib\nprint(pathlib.Path(mineru_vram.__file__).resolve().parent)\n"
    )
    monkeypatch.syspath_prepend(str(lib))  # a folder the parent imports from on purpose travels
    marker = tmp_path / "hijacked"
    (tmp_path / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom json import *\n")
    # The attack works on a plain `python -c` started in that folder (so the test can fail) ...
    subprocess.run([sys.executable, "-c", "import json"], cwd=tmp_path, check=False)
    assert marker.exists()
    marker.unlink()
    # ... and not on our children, which still import this package from the parent's path.
    code = _process.python_command("where_from")
    run = subprocess.run(code, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert not marker.exists()
    assert run.stdout.strip() == str(Path(mv.__file__).resolve().parent)
    assert "" not in _process.child_sys_path()


def test_private_dir_is_created_0700_and_refuses_what_others_can_write(tmp_path: Path) -> None:
    mine = _files.private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert _files.private_dir(mine) == mine  # existing and ours: fine

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(mv.InsecurePathError, match="others can write"):
        _files.private_dir(open_dir)

    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(mv.InsecurePathError, match="symbolic link") as info:
        _files.private_dir(link)
    assert isinstance(info.value, PermissionError)
    assert info.value.path == str(link)


@needs_root
def test_private_dir_refuses_a_folder_another_user_created_first(shared_tmp: Path) -> None:
    squatted = shared_tmp / "mineru-vram-0"
    as_nobody(["mkdir", "-m", "700", str(squatted)])
    with pytest.raises(mv.InsecurePathError, match="belongs to uid 65534"):
        _files.private_dir(squatted)


def test_check_private_says_whether_a_path_exists_and_refuses_one_others_could_swap(tmp_path: Path) -> None:
    assert _files.check_private(tmp_path / "missing") is False
    mine = tmp_path / "mine"
    mine.write_bytes(b"x")
    mine.chmod(0o644)  # readable by others is not a risk to us; writable is
    assert _files.check_private(mine) is True
    assert _files.check_private(tmp_path, folder=True) is True
    mine.chmod(0o666)
    with pytest.raises(mv.InsecurePathError, match="others can write"):
        _files.check_private(mine)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(mv.InsecurePathError, match="symbolic link"):
        _files.check_private(tmp_path / "link")
    with pytest.raises(mv.InsecurePathError, match="not a regular file"):
        _files.check_private(tmp_path)


def test_private_file_never_follows_a_link(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    (tmp_path / "out.md").symlink_to(target)
    with pytest.raises(mv.InsecurePathError, match="symbolic link"), _files.private_file(tmp_path / "out.md", "wb"):
        pass
    assert target.read_bytes() == b"precious"
    with _files.private_file(tmp_path / "new", "wb") as fh:
        fh.write(b"x")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600


_HOLDER = (
    "import sys, time; from mineru_vram._files import OwnerLock; "
    "lock = OwnerLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
)


def test_owner_lock_marks_a_live_owner_and_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "owner.lock"
    assert _files.owner_alive(path) is None
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert _files.owner_alive(path) is True
        holder.kill()
        holder.wait(10)
        assert _files.owner_alive(path) is False
        assert path.exists()
        assert _files.owner_alive(path, remove_if_dead=True) is False
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
    with _files.OwnerLock(path) as lock:
        assert lock.held
        assert _files.owner_alive(path) is True
    assert not path.exists()


_DIR_HOLDER = (
    "import sys, time; from mineru_vram._files import owned_temp_dir; "
    "folder, lock = owned_temp_dir('mv-test-', sys.argv[1]); print(folder, flush=True); time.sleep(60)"
)


def test_owned_folders_are_swept_only_once_their_owner_died(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _DIR_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        dead = Path(holder.stdout.readline().strip())
        assert dead.parent == tmp_path
        assert stat.S_IMODE(dead.stat().st_mode) == 0o700
        (dead / "left-over.log").write_text("log")
        mine, lock = _files.owned_temp_dir("mv-test-", tmp_path)
        unlocked = tmp_path / "mv-test-nolock"  # its owner may be about to lock it
        unlocked.mkdir()
        other = tmp_path / "someone-elses-folder"
        other.mkdir()
        assert _files.sweep_dead_owners(tmp_path, "mv-test-") == [], "a live owner's folder is kept"
        holder.kill()
        holder.wait(10)
        assert _files.sweep_dead_owners(tmp_path, "mv-test-") == [dead]
        assert not dead.exists()
        assert mine.is_dir()
        assert unlocked.is_dir()
        assert other.is_dir()
        lock.release()
        assert _files.sweep_dead_owners(tmp_path, "mv-test-") == [], "a released lock file is gone, not dead"
    finally:
        holder.kill()
        holder.wait(10)
        assert holder.stdout is not None
        holder.stdout.close()


def test_exclusive_serialises_threads_and_names_the_file_on_timeout(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    inside: list[int] = []
    overlap: list[bool] = []

    def work() -> None:
        with _files.exclusive(path):
            inside.append(1)
            overlap.append(len(inside) > 1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [False] * 4
    with _files.exclusive(path):
        failed: list[BaseException] = []

        def contender() -> None:
            try:
                with _files.exclusive(path, timeout=0.2):
                    pass
            except TimeoutError as exc:
                failed.append(exc)

        t = threading.Thread(target=contender)
        t.start()
        t.join()
    assert failed
    assert str(path) in str(failed[0])


def test_listening_pids_sees_our_sockets(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert _process.listening_pids(port) == set(), "bound but not listening"
        sock.listen()
        assert _process.listening_pids(port) == {os.getpid()}


@needs_root
def test_listening_pids_never_claims_another_users_socket(tmp_path: Path) -> None:
    port = _process.free_port()
    squatter = as_nobody(
        [
            sys.executable,
            "-I",
            "-c",
            f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); "
            "s.listen(); print('up', flush=True); time.sleep(30)",
        ],
        wait=False,
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline().strip() == "up"
        assert _process.listening_pids(port) == set()
    finally:
        squatter.kill()
        squatter.wait(10)
        squatter.stdout.close()


def test_log_tail_and_trim(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    assert _process.log_tail(log) == ""
    log.write_bytes(b"x" * 200_000 + b"\nlast line\n")
    assert _process.log_tail(log, 10) == "last line\n"
    _process.trim_log(log, limit=1_000_000)
    assert log.stat().st_size == 200_011, "under the limit nothing is cut"
    _process.trim_log(log, limit=100_000, keep_chars=1000)
    text = log.read_text()
    assert text.startswith("[... earlier log cut")
    assert text.endswith("x\nlast line\n")
    assert log.stat().st_size < 2000


def test_signal_names() -> None:
    assert _process.signal_name(-signal.SIGKILL) == "SIGKILL"
    assert _process.signal_name(128 + signal.SIGSEGV) == "SIGSEGV"
    assert _process.signal_name(0) is None
    assert _process.signal_name(1) is None
    assert _process.signal_name(None) is None
