"""Importing mineru_vram touches nothing; probes never create what they measure."""

import json
import subprocess
import sys

import mineru_vram as mv


def _run(code: str, env_extra: dict[str, str] | None = None) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_no_heavy_module_and_reads_no_env() -> None:
    code = (
        "import os, sys, json\n"
        "class Spy(dict):\n"
        "    reads = []\n"
        "    def get(self, k, d=None):\n"
        "        Spy.reads.append(k); return super().get(k, d)\n"
        "    def __getitem__(self, k):\n"
        "        Spy.reads.append(k); return super().__getitem__(k)\n"
        "import mineru_vram, mineru_vram.testing\n"
        "heavy = [m for m in ('torch', 'mineru', 'pynvml', 'transformers', 'numpy') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy}))\n"
    )
    assert _run(code) == {"heavy": []}


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
