"""Importing mineru_vram touches nothing; probes never create what they measure."""

import json
import subprocess
import sys

import pytest

import mineru_vram as mv


def _run(code: str, env_extra: dict[str, str] | None = None) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


_SPY = """
import collections.abc, json, os, sys

class Spy(collections.abc.MutableMapping):
    # Records which module read which variable, then answers from the real environment.
    reads = []
    def __init__(self, real): self.real = real
    def _note(self, key):
        Spy.reads.append((sys._getframe(2).f_globals.get('__name__', '?'), key))
    def __getitem__(self, key): self._note(key); return self.real[key]
    def get(self, key, default=None): self._note(key); return self.real.get(key, default)
    def __contains__(self, key): self._note(key); return key in self.real
    def __setitem__(self, key, value): self.real[key] = value
    def __delitem__(self, key): del self.real[key]
    def __iter__(self): return iter(self.real)
    def __len__(self): return len(self.real)

os.environ = Spy(os.environ)
import mineru_vram, mineru_vram.testing, mineru_vram.pytest_plugin
ours = [r for r in Spy.reads if r[0].startswith('mineru_vram')]
heavy = [m for m in ('torch', 'mineru', 'pynvml', 'transformers', 'numpy') if m in sys.modules]
mineru_vram._config.getenv('MINERU_VRAM_DEVICE')  # proves the spy sees our reads
print(json.dumps({'heavy': heavy, 'import_reads': ours, 'probe_read': Spy.reads[-1]}))
"""


def test_import_loads_no_heavy_module_and_reads_no_env() -> None:
    got = _run(_SPY)
    assert got["heavy"] == []
    assert got["import_reads"] == [], "importing mineru_vram read the environment"
    assert got["probe_read"] == ["mineru_vram._config", "MINERU_VRAM_DEVICE"], "the spy does not see reads"


def test_snapshot_on_cpu_says_so_without_importing_torch() -> None:
    code = (
        "import sys, json, mineru_vram as mv\n"
        "s = mv.vram_snapshot('cpu')\n"
        "print(json.dumps({'gpu': s.gpu_available, 'reason': s.reason, 'torch': 'torch' in sys.modules,"
        " 'text': str(s)}))\n"
    )
    got = _run(code)
    assert got["gpu"] is False
    assert got["reason"]
    assert got["torch"] is False
    assert "no GPU" in str(got["text"])


def test_snapshot_never_initialises_cuda_when_torch_is_loaded() -> None:
    code = (
        "import json, torch, mineru_vram as mv\n"
        "s = mv.vram_snapshot()\n"
        "print(json.dumps({'init': torch.cuda.is_initialized(), 'ctx': s.cuda_initialized}))\n"
    )
    assert _run(code) == {"init": False, "ctx": False}


def test_snapshot_renders_for_terminals_and_notebooks() -> None:
    snap = mv.vram_snapshot("cpu")
    assert str(snap).startswith("VramSnapshot(cpu")
    html = snap._repr_html_()
    assert "<table>" in html
    assert "torch allocated" in html
    assert snap.to_dict()["device"] == "cpu"


def test_nvml_process_lists_are_merged_by_pid_keeping_the_larger_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Vulkan process (llama.cpp) may be listed only as a graphics process; one in both lists counts once.

    NVML itself is replaced by a stand-in here (no GPU on the test machines): the two getters are
    what ``_probe`` calls, with the fields it reads.
    """
    from types import SimpleNamespace

    from mineru_vram import _probe

    def proc(pid: int, mib: float | None) -> SimpleNamespace:
        return SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else int(mib * _probe.MIB))

    nvml = SimpleNamespace(
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [proc(10, 500), proc(11, 300), proc(13, None)],
        nvmlDeviceGetGraphicsRunningProcesses=lambda handle: [proc(11, 1800), proc(12, 900), proc(13, 40)],
    )
    monkeypatch.setattr(_probe, "_nvml", lambda: nvml)
    used = {int(p.pid): p.usedGpuMemory / _probe.MIB for p in _probe._running_processes(object())}
    assert used == {10: 500, 11: 1800, 12: 900, 13: 40}


def test_a_torch_built_without_cuda_is_named_for_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU that NVML sees, with a CPU-only torch in the process (MINERU_VRAM_TORCH=cpu set-ups):
    # NVML's side is stood in for, torch's build is the fact under test.
    from types import SimpleNamespace

    from mineru_vram import _probe

    monkeypatch.setattr(_probe, "_nvml", object)
    monkeypatch.setattr(_probe, "_nvml_handle", lambda index: object())
    cpu_torch = SimpleNamespace(__version__="2.9.0+cpu", version=SimpleNamespace(cuda=None))
    monkeypatch.setitem(sys.modules, "torch", cpu_torch)
    assert _probe.cuda_device_problem("cuda:0") == "the torch in this process (2.9.0+cpu) is built without CUDA"
    cuda_torch = SimpleNamespace(__version__="2.9.0", version=SimpleNamespace(cuda="12.8"))
    monkeypatch.setitem(sys.modules, "torch", cuda_torch)
    assert _probe.cuda_device_problem("cuda:0") is None
    assert _probe.cuda_device_problem("cpu") is None


def test_cuda_visible_devices_by_uuid_maps_to_nvmls_card(monkeypatch: pytest.MonkeyPatch) -> None:
    # The context-floor child and every probe map cuda:N through here; a UUID in
    # CUDA_VISIBLE_DEVICES once made the floor silently None. NVML is stood in for.
    from types import SimpleNamespace

    from mineru_vram import _probe

    asked: list[tuple[str, object]] = []
    nvml = SimpleNamespace(
        nvmlDeviceGetHandleByIndex=lambda i: asked.append(("index", i)) or f"card{i}",
        nvmlDeviceGetHandleByUUID=lambda u: asked.append(("uuid", u)) or f"card-{u}",
    )
    monkeypatch.setattr(_probe, "_nvml", lambda: nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8c3f1a2b-0000-1111-2222-333344445555,3,MIG-1234")
    assert _probe._nvml_handle(0) == "card-GPU-8c3f1a2b-0000-1111-2222-333344445555"
    assert _probe._nvml_handle(1) == "card3"
    assert _probe._nvml_handle(2) == "card-MIG-1234"
    assert _probe._nvml_handle(3) is None, "past the visible list: no card"
    assert asked == [("uuid", "GPU-8c3f1a2b-0000-1111-2222-333344445555"), ("index", 3), ("uuid", "MIG-1234")]


def test_holders_name_each_process_on_a_card_by_its_command_line() -> None:
    import os

    from mineru_vram._probe import DeviceMemory, ProcessMemory, holders

    card = DeviceMemory(
        index=0,
        name="stand-in card",
        total_mib=1000.0,
        used_mib=700.0,
        free_mib=300.0,
        processes=(ProcessMemory(pid=os.getpid(), used_mib=692.04, name="python"),),
    )
    [(pid, mib, command)] = holders(card)
    assert pid == os.getpid()
    assert mib == 692.0
    assert "pytest" in command or "python" in command
    ghost = ProcessMemory(pid=2**22 + 7, used_mib=5.0, name="ghost")
    gone = DeviceMemory(index=0, name="x", total_mib=1.0, used_mib=1.0, free_mib=0.0, processes=(ghost,))
    assert holders(gone) == [(2**22 + 7, 5.0, "ghost")], "a process that is gone keeps the name NVML gave"
