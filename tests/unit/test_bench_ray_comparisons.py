"""The verdict arithmetic of ``benchmarks/bench_ray.py``: which loops a Ray phase is held against.

The GPU runs decide #15's one-GPU target by these numbers, so the pairing is pinned here on
made-up rates (the benchmark itself needs a GPU and Ray).
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ray", REPO_ROOT / "benchmarks" / "bench_ray.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(rates: dict[str, float]) -> dict[str, Any]:
    return {phase: {"steady_docs_per_s": rate} for phase, rate in rates.items()}


def test_each_one_gpu_phase_is_held_against_the_nearest_loop_on_either_side(bench: ModuleType) -> None:
    rates = {"loop": 1.0, "ray_1gpu": 0.9, "ray_1gpu@pool": 0.6, "loop#2": 0.8, "ray_1gpu#2": 1.2, "loop#3": 1.2}
    out = bench._comparisons(_result(rates), list(rates))

    pairs = out["ray_1gpu_vs_adjacent_loops"]
    assert pairs["ray_1gpu"] == pytest.approx(0.9 / 0.9, abs=1e-4)  # loop before, loop#2 after (the pool phase between)
    assert pairs["ray_1gpu@pool"] == pytest.approx(0.6 / 0.9, abs=1e-4)
    assert pairs["ray_1gpu#2"] == pytest.approx(1.2 / 1.0, abs=1e-4)
    # the verdict is the default variant's median; the pool is reported beside it, never mixed in
    assert out["ray_1gpu_vs_loop"] == pytest.approx(statistics.median([1.0, 1.2]))
    assert out["variants_vs_adjacent_loops"]["ray_1gpu@pool"]["phases"] == 1
    assert out["variants_vs_adjacent_loops"]["ray_1gpu"]["phases"] == 2
    assert out["loop_spread"] == pytest.approx((1.2 - 0.8) / 1.0)


def test_a_ray_phase_at_the_end_has_only_the_loop_before_it(bench: ModuleType) -> None:
    rates = {"loop": 1.0, "ray_1gpu": 0.93}
    out = bench._comparisons(_result(rates), list(rates))
    assert out["ray_1gpu_vs_loop"] == pytest.approx(0.93)


def test_paired_phases_are_reported_on_their_own(bench: ModuleType) -> None:
    result: dict[str, Any] = {"paired": {"ray_vs_loop": 1.02}, "paired#2": {"ray_vs_loop": 0.97}}
    out = bench._comparisons(result, ["paired", "paired#2"])
    assert out["paired_ray_vs_loop"] == {"paired": 1.02, "paired#2": 0.97}
    assert "ray_1gpu_vs_loop" not in out


def test_the_interval_of_per_document_ratios_brackets_their_mean(bench: ModuleType) -> None:
    ratios = [0.9, 1.0, 1.1, 0.95, 1.05, 1.0, 0.98, 1.02]
    low, high = bench._bootstrap_ci(ratios)
    assert low < sum(ratios) / len(ratios) < high
    assert high - low < 0.2
    assert bench._bootstrap_ci(ratios[:4]) is None  # too few documents to say
