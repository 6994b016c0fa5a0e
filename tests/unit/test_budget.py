"""Budgets, admission and the cross-process ledger.

NVML is the one thing stood in for: :class:`StandInDevice` plays a GPU whose free
memory the test controls (``probe=``). The ledger, its file locks, the clock and
the processes are real.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mineru_vram as mv
from mineru_vram._budget import (
    Ledger,
    LedgerEntry,
    VramBudget,
    admit,
    default_runtime_dir,
    device_key,
    outstanding_mib,
    parse_budget,
    resolve_budget,
)
from mineru_vram._probe import DeviceMemory, ProcessMemory
from support import as_nobody, needs_root, shared_tmp

__all__ = ["shared_tmp"]  # a fixture, used by name

GIB = 1024.0
KEY = device_key("cuda:0")  # the ledger's name for the device (NVML's UUID where there is a GPU)


class StandInDevice:
    """Stand-in for NVML: a 16 GiB card whose free memory and process list the test sets."""

    def __init__(self, free_mib: float, total_mib: float = 16 * GIB, processes: tuple[ProcessMemory, ...] = ()) -> None:
        self.free_mib = free_mib
        self.total_mib = total_mib
        self.processes = processes
        self.reads = 0
        self.lock = threading.Lock()

    def __call__(self, device: str) -> DeviceMemory:
        with self.lock:
            self.reads += 1
            return DeviceMemory(
                index=0,
                name="Stand-in GPU",
                total_mib=self.total_mib,
                used_mib=self.total_mib - self.free_mib,
                free_mib=self.free_mib,
                processes=self.processes,
            )


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "runtime")


# --- the budget value -----------------------------------------------------------------------


def test_budget_takes_exactly_one_of_mib_and_fraction() -> None:
    with pytest.raises(mv.ConfigurationError, match="exactly one"):
        VramBudget()
    with pytest.raises(mv.ConfigurationError, match="exactly one"):
        VramBudget(mib=1024, fraction=0.5)
    for bad in (0, -5, float("inf"), True):
        with pytest.raises(mv.ConfigurationError, match="positive"):
            VramBudget(mib=bad)
    for bad_fraction in (0.0, 1.5, -0.1):
        with pytest.raises(mv.ConfigurationError, match="at most 1"):
            VramBudget(fraction=bad_fraction)
    with pytest.raises(mv.ConfigurationError):
        VramBudget(mib=1, timeout=-1)


@pytest.mark.parametrize(
    ("value", "mib", "fraction"),
    [
        (6144, 6144.0, None),
        (0.25, None, 0.25),
        (1.0, None, 1.0),
        (2048.5, 2048.5, None),
        ("6144", 6144.0, None),
        ("6144MiB", 6144.0, None),
        ("6GiB", 6144.0, None),
        ("6 g", 6144.0, None),
        ("0.5", None, 0.5),
        ("25%", None, 0.25),
    ],
)
def test_resolve_budget(value: object, mib: float | None, fraction: float | None) -> None:
    budget = resolve_budget(value)  # type: ignore[arg-type]
    assert budget is not None
    assert (budget.mib, budget.fraction) == (mib, fraction)


def test_resolve_budget_rejects_nonsense() -> None:
    assert resolve_budget(None) is None
    for bad in ("lots", "6 parsecs", True, [1]):
        with pytest.raises(mv.ConfigurationError):
            resolve_budget(bad)  # type: ignore[arg-type]
    with pytest.raises(mv.ConfigurationError, match="at most 1"):
        parse_budget("150%")


def test_budget_arithmetic_for_mineru_and_engines() -> None:
    total = 81559.0  # an H100 by NVML
    assert VramBudget(6144).virtual_vram_gb(total) == 6
    assert VramBudget(6143).virtual_vram_gb(total) == 5  # rounded down: never size for more than the budget
    assert VramBudget(100).virtual_vram_gb(total) == 1  # MinerU needs a positive integer
    assert VramBudget(fraction=0.5).virtual_vram_gb(total) == 39
    assert VramBudget(fraction=0.5).virtual_vram_gb(None) is None
    assert VramBudget(8 * 1024).env(total) == {"MINERU_VIRTUAL_VRAM_SIZE": "8"}
    assert VramBudget(8 * 1024).engine_fraction(total) == 0.1  # floor(8192 / 81559, 3 decimals)
    assert VramBudget(fraction=0.3).engine_fraction(total) == 0.3
    with pytest.raises(mv.ConfigurationError, match="not below"):
        VramBudget(90_000).engine_fraction(total)
    with pytest.raises(mv.ConfigurationError, match=r"0\.1%"):
        VramBudget(10).engine_fraction(total)


def test_budget_round_trips_through_json_without_its_probe() -> None:
    b = VramBudget(fraction=0.4, timeout=12.0, headroom_mib=512, probe=StandInDevice(1))
    data = json.loads(json.dumps(b.to_json()))
    assert "probe" not in data
    back = VramBudget.from_json(data)
    assert back == b  # the probe does not take part in equality
    assert back.probe is None


def test_runtime_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINERU_VRAM_RUNTIME_DIR", str(tmp_path / "env"))
    assert default_runtime_dir(tmp_path / "arg") == tmp_path / "arg"
    assert default_runtime_dir() == tmp_path / "env"
    monkeypatch.delenv("MINERU_VRAM_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_runtime_dir() == tmp_path / "mineru-vram"


# --- admission ------------------------------------------------------------------------------


def test_admission_on_cpu_measures_and_reserves_nothing(ledger: Ledger) -> None:
    device = StandInDevice(free_mib=0)
    r = admit(VramBudget(4096, probe=device), "cpu", ledger=ledger)
    assert device.reads == 0
    assert not r.held
    assert r.virtual_vram_gb == 4


def test_admission_reserves_at_once_when_free_and_releases(ledger: Ledger) -> None:
    device = StandInDevice(free_mib=10 * GIB)
    r = admit(VramBudget(6 * GIB, probe=device), "cuda:0", ledger=ledger, what="test")
    assert r.held
    assert r.need_mib == 6 * GIB
    assert r.virtual_vram_gb == 6
    entries = ledger.snapshot(KEY)
    assert [(e.need_mib, e.pids, e.what) for e in entries] == [(6 * GIB, (os.getpid(),), "test")]
    r.release()
    r.release()  # idempotent
    assert ledger.snapshot(KEY) == []


def test_admission_waits_until_the_device_has_the_memory(ledger: Ledger) -> None:
    device = StandInDevice(free_mib=2 * GIB)

    def free_later() -> None:
        time.sleep(0.3)
        device.free_mib = 12 * GIB

    threading.Thread(target=free_later).start()
    t0 = time.monotonic()
    with admit(VramBudget(8 * GIB, probe=device, poll_interval=0.02, timeout=10), "cuda:0", ledger=ledger) as r:
        waited = time.monotonic() - t0
        assert r.held
    assert 0.25 <= waited < 5
    assert r.waited == pytest.approx(waited, abs=0.1)
    assert device.reads > 3  # it polled


def test_admission_times_out_with_a_clear_error(ledger: Ledger) -> None:
    holders = (ProcessMemory(pid=4242, used_mib=12 * GIB, name="other-app"),)
    device = StandInDevice(free_mib=3 * GIB, processes=holders)
    clock = [0.0]
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:  # time runs only when admission sleeps
        sleeps.append(seconds)
        clock[0] += seconds

    with pytest.raises(mv.AdmissionTimeoutError) as info:
        admit(
            VramBudget(6 * GIB, probe=device, timeout=5, poll_interval=0.5, headroom_mib=512),
            "cuda:0",
            ledger=ledger,
            what="ModelSession(pipeline)",
            clock=lambda: clock[0],
            sleep=fake_sleep,
        )
    err = info.value
    assert isinstance(err, TimeoutError)
    text = str(err)
    for part in ("ModelSession(pipeline)", "6144 MiB", "512 MiB headroom", "3072 MiB free", "within 5s", "pid 4242"):
        assert part in text
    assert err.need_mib == 6 * GIB
    assert err.free_mib == 3 * GIB
    assert sum(sleeps) == pytest.approx(5.0)
    assert ledger.snapshot(KEY) == []  # nothing reserved
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.need_mib, str(back)) == (mv.AdmissionTimeoutError, err.need_mib, text)


def test_a_budget_that_can_never_fit_fails_at_once(ledger: Ledger) -> None:
    device = StandInDevice(free_mib=16 * GIB)
    with pytest.raises(mv.ConfigurationError, match="can never fit"):
        admit(VramBudget(20 * GIB, probe=device), "cuda:0", ledger=ledger)
    assert device.reads == 1


def test_fraction_budget_without_nvml_is_a_configuration_error(ledger: Ledger) -> None:
    with pytest.raises(mv.ConfigurationError, match="NVML cannot read"):
        admit(VramBudget(fraction=0.5, probe=lambda device: None), "cuda:0", ledger=ledger)


def test_reservations_of_others_count_until_they_allocate(ledger: Ledger) -> None:
    """Two admissions on one 10 GiB-free card: the second waits for the first's reservation."""
    device = StandInDevice(free_mib=10 * GIB)
    first = admit(VramBudget(6 * GIB, probe=device), "cuda:0", ledger=ledger)
    with pytest.raises(mv.AdmissionTimeoutError, match="reserved 6144 MiB"):
        admit(VramBudget(6 * GIB, probe=device, timeout=0.1, poll_interval=0.02), "cuda:0", ledger=ledger)
    first.release()
    admit(VramBudget(6 * GIB, probe=device, timeout=0.1), "cuda:0", ledger=ledger).release()


def test_outstanding_subtracts_what_the_holder_already_allocated() -> None:
    entry = LedgerEntry(id="a", need_mib=6000, pids=(111,), base_mib=500, what="", host="", created=0)
    other = ProcessMemory(pid=999, used_mib=100)

    def card(*procs: ProcessMemory) -> DeviceMemory:
        return DeviceMemory(index=0, name="x", total_mib=16000, used_mib=0, free_mib=0, processes=procs)

    assert outstanding_mib([entry], card(ProcessMemory(111, 500), other)) == 6000  # nothing loaded yet
    assert outstanding_mib([entry], card(ProcessMemory(111, 4500), other)) == 2000  # 4000 loaded
    assert outstanding_mib([entry], card(ProcessMemory(111, 9000), other)) == 0  # over budget: NVML has it all
    assert outstanding_mib([entry], card()) == 6000  # no per-process figures: count it in full
    twin = LedgerEntry(id="b", need_mib=1000, pids=(111,), base_mib=700, what="", host="", created=0)
    # Two reservations of one process share its growth (from the earlier base).
    assert outstanding_mib([entry, twin], card(ProcessMemory(111, 4500), other)) == 3000


def test_a_worker_started_after_admission_spends_the_reservation(ledger: Ledger) -> None:
    parent = ProcessMemory(pid=111, used_mib=500)
    device = StandInDevice(free_mib=10 * GIB, processes=(parent,))
    with admit(VramBudget(6000, probe=device), "cuda:0", ledger=ledger, pids=[111]) as r:
        (entry,) = ledger.snapshot(KEY)
        assert (entry.pids, entry.base_mib) == ((111,), 500)
        r.set_pids([111, 222])  # the isolated session's worker, which loaded 4000 MiB meanwhile
        (entry,) = ledger.snapshot(KEY)
        assert (entry.pids, entry.base_mib) == ((111, 222), 500)
        now = DeviceMemory(
            index=0, name="x", total_mib=16 * GIB, used_mib=0, free_mib=0, processes=(parent, ProcessMemory(222, 4000))
        )
        assert outstanding_mib([entry], now) == 2000


def test_session_admission_happens_before_anything_loads(tmp_path: Path) -> None:
    device = StandInDevice(free_mib=1 * GIB)
    session = mv.ModelSession(
        "flash",
        device="cuda:0",
        budget=VramBudget(8 * GIB, probe=device, timeout=0.2, poll_interval=0.05),
        trust_env=False,
    )
    with pytest.raises(mv.AdmissionTimeoutError):
        session.open()
    assert session.state is mv.SessionState.CLOSED
    assert session.runner is None  # no runner was made: nothing loaded, no CUDA touched
    assert session.reservation is None or not session.reservation.held


# --- several processes ------------------------------------------------------------------------

_CONTENDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from mineru_vram._budget import Ledger, VramBudget, admit
    from mineru_vram._exceptions import AdmissionTimeoutError
    from mineru_vram._probe import DeviceMemory

    def probe(device):  # stand-in for NVML: 10 GiB free, no per-process figures
        return DeviceMemory(index=0, name="Stand-in GPU", total_mib=16384, used_mib=6144, free_mib=10240)

    runtime, go, hold = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    while not go.exists():
        time.sleep(0.005)
    try:
        r = admit(VramBudget(6144, probe=probe, timeout=1.0, poll_interval=0.05), "cuda:0", ledger=Ledger(runtime))
    except AdmissionTimeoutError:
        print(json.dumps({"admitted": False, "t": time.time()}), flush=True)
        sys.exit(0)
    print(json.dumps({"admitted": True, "t": time.time()}), flush=True)
    time.sleep(hold)
    r.release()
    """
)


def test_two_processes_never_both_take_the_same_free_memory(tmp_path: Path) -> None:
    runtime, go = tmp_path / "runtime", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(runtime), str(go), "3.0"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    time.sleep(1.0)  # both are polling for the start signal
    go.touch()
    outcomes = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        outcomes.append(json.loads(out.strip().splitlines()[-1])["admitted"])
    assert sorted(outcomes) == [False, True]
    assert Ledger(runtime).snapshot(KEY) == []  # the winner released on exit


def test_a_killed_holders_reservation_is_recognised_as_stale(tmp_path: Path) -> None:
    runtime, go = tmp_path / "runtime", tmp_path / "go"
    go.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", _CONTENDER, str(runtime), str(go), "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert json.loads(holder.stdout.readline())["admitted"]
        ledger = Ledger(runtime)
        assert len(ledger.snapshot(KEY)) == 1
        device = StandInDevice(free_mib=10 * GIB)
        with pytest.raises(mv.AdmissionTimeoutError):
            admit(VramBudget(6 * GIB, probe=device, timeout=0.1, poll_interval=0.02), "cuda:0", ledger=ledger)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        # The dead holder's lock is gone with it: its entry is stale and removed, and we are admitted.
        with admit(VramBudget(6 * GIB, probe=device, timeout=0.1), "cuda:0", ledger=ledger) as r:
            entries = ledger.snapshot(KEY)
            assert [e.id for e in entries] == [r.id]
    finally:
        holder.kill()
        holder.communicate(timeout=30)  # reaps it and closes its pipe


@needs_root
def test_a_ledger_folder_another_user_made_first_is_refused_typed(shared_tmp: Path) -> None:
    # The default folder, <tmp>/mineru-vram-<uid>, is predictable: another local user can make it
    # first (to read or block our reservations). Admission refuses it with a typed error.
    squatted = shared_tmp / "mineru-vram-0"
    as_nobody(["mkdir", "-m", "777", str(squatted)])
    as_nobody(["mkdir", "-m", "777", str(squatted / "ledger")])
    device = StandInDevice(20 * GIB)
    with pytest.raises(mv.InsecurePathError, match="belongs to uid 65534") as info:
        admit(VramBudget(GIB, probe=device), "cuda:0", ledger=Ledger(squatted))
    assert isinstance(info.value, PermissionError)


def test_ledger_folders_are_private(ledger: Ledger) -> None:
    device = StandInDevice(20 * GIB)
    with admit(VramBudget(GIB, probe=device), "cuda:0", ledger=ledger):
        folders = [ledger.root, *ledger.root.iterdir()]
        files = list(ledger.root.rglob("res-*.json"))
        assert files
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o700 for f in folders)
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def test_trust_env_false_keeps_the_ledger_out_of_the_environments_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mineru_vram import _session

    monkeypatch.setenv("MINERU_VRAM_RUNTIME_DIR", str(tmp_path / "from-env"))
    assert Ledger().runtime_dir == tmp_path / "from-env"
    assert Ledger(trust_env=False).runtime_dir != tmp_path / "from-env"
    assert Ledger(tmp_path / "given", trust_env=False).runtime_dir == tmp_path / "given"
    made: list[Path] = []

    class Recording(Ledger):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self.runtime_dir)

    monkeypatch.setattr(_session, "Ledger", Recording)
    for trust in (False, True):
        budget = VramBudget(8 * GIB, probe=StandInDevice(free_mib=1 * GIB), timeout=0.1, poll_interval=0.05)
        with pytest.raises(mv.AdmissionTimeoutError):
            mv.ModelSession("flash", device="cuda:0", budget=budget, trust_env=trust).open()
    assert made[0] != tmp_path / "from-env"
    assert made[1] == tmp_path / "from-env"
