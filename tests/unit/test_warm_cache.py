"""The warm cache on its own: budgets, least recently used out, keys never shared, clear, exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mineru_vram._warm import WarmCache, WarmKey  # noqa: E402


class Wrapper:
    """Shaped like a MinerU model wrapper: a module, a loose tensor, a device string, a nested list."""

    def __init__(self, mib: float) -> None:
        n = int(mib * 1024 * 1024 / 4)
        self.net = torch.nn.Linear(1, 1)
        self.net.weight = torch.nn.Parameter(torch.zeros(n, 1))
        self.mean = torch.ones(4)  # not a parameter or buffer: .to() would not move it
        self.device = "cpu"
        self.parts = [{"head": torch.nn.Linear(2, 2)}]


def key(device: str = "cpu", models: str = "/m") -> WarmKey:
    return WarmKey(device=device, models_dir=models, model_source="local", small_backend="torch")


def test_park_then_take_gives_the_same_objects_and_empties_the_entry() -> None:
    cache = WarmCache(budget_mib=100)
    models = {("atom", 1): Wrapper(8)}
    report = cache.park(key(), models, labels=["atom:1"])
    assert report.parked == ("atom:1",)
    assert report.reason is None
    assert 8 <= report.mib < 9
    assert key() in cache
    assert cache.take(key("cpu", "/other")) is None, "other settings never get these models"
    back = cache.take(key())
    assert back is not None
    assert back[0][("atom", 1)] is models[("atom", 1)]
    assert cache.take(key()) is None, "taken once"
    assert cache.size_mib == 0


def test_least_recently_used_entries_make_room_and_too_large_is_refused() -> None:
    cache = WarmCache(budget_mib=20)
    cache.park(key(models="/a"), {("a", 0): Wrapper(8)}, labels=["a"])
    cache.park(key(models="/b"), {("b", 0): Wrapper(8)}, labels=["b"])
    report = cache.park(key(models="/c"), {("c", 0): Wrapper(8)}, labels=["c"])
    assert report.evicted == (str(key(models="/a")),)
    assert [e.key.models_dir for e in cache.entries()] == ["/b", "/c"]
    assert cache.size_mib <= 20
    too_big = cache.park(key(models="/d"), {("d", 0): Wrapper(30)}, labels=["d"])
    assert too_big.parked == ()
    assert too_big.reason is not None
    assert "exceed the host cache" in too_big.reason
    assert key(models="/d") not in cache
    cache.set_budget(9)
    assert [e.key.models_dir for e in cache.entries()] == ["/c"]
    assert cache.clear() > 7
    assert len(cache) == 0


def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINERU_VRAM_HOST_CACHE_MIB", "12")
    assert WarmCache().budget_mib == 12
    monkeypatch.delenv("MINERU_VRAM_HOST_CACHE_MIB")
    assert 0 < WarmCache().budget_mib <= 8192


def test_the_process_cache_is_cleared_at_interpreter_exit_without_error() -> None:
    code = (
        "import torch\n"
        "from mineru_vram._warm import warm_cache, WarmKey\n"
        "k = WarmKey('cpu', '/m', 'local', 'torch')\n"
        "r = warm_cache().park(k, {('atom', 1): torch.nn.Linear(64, 64)}, labels=['atom:1'])\n"
        "assert r.parked, r\n"
        "print(warm_cache())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "WarmCache(1 entries" in run.stdout
    assert run.stderr.strip() == "", run.stderr
