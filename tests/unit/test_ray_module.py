"""mineru_vram.ray without a cluster: the import rules, budgets as GPU shares, the summary's verdict."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import mineru_vram as mv


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_importing_mineru_vram_never_imports_ray() -> None:
    run = _python(
        "import sys, mineru_vram, mineru_vram.testing, mineru_vram.pytest_plugin\nprint('ray' in sys.modules)"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_without_ray_the_import_error_names_the_extra() -> None:
    # None in sys.modules makes `import ray` fail as it does where Ray is not installed.
    run = _python("import sys\nsys.modules['ray'] = None\nimport mineru_vram.ray")
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: mineru_vram.ray needs Ray Data")
    assert "pip install 'mineru-vram[ray]'" in last


ray_module = pytest.importorskip("mineru_vram.ray", reason="Ray is not installed (pip install 'mineru-vram[ray]')")


def test_a_fraction_budget_is_its_share_of_a_gpu() -> None:
    assert ray_module.gpu_share(mv.VramBudget(fraction=0.5)) == 0.5
    assert ray_module.gpu_share(mv.VramBudget(fraction=0.333)) == 0.34  # rounded up to a hundredth
    with_headroom = mv.VramBudget(fraction=0.25, headroom_mib=1024)
    assert ray_module.gpu_share(with_headroom, gpu_memory_mib=81920) == 0.27


def test_a_mib_budget_is_divided_by_the_card() -> None:
    assert ray_module.gpu_share(mv.VramBudget(mib=20480), gpu_memory_mib=81920) == 0.25
    assert ray_module.gpu_share(mv.VramBudget(mib=20481), gpu_memory_mib=81920) == 0.26
    with pytest.raises(mv.ConfigurationError, match="one session runs on one card"):
        ray_module.gpu_share(mv.VramBudget(mib=90000), gpu_memory_mib=81920)


def test_a_mib_budget_without_a_card_to_size_it_is_refused() -> None:
    if mv.vram_snapshot(0).total_mib is not None:
        pytest.skip("this machine has a GPU to size the budget against")
    with pytest.raises(mv.ConfigurationError, match="gpu_memory_mib="):
        ray_module.gpu_share(mv.VramBudget(mib=6144))


def _summary(*, back: bool | None, status: str = "closed") -> Any:
    gpu = ray_module.GpuRecord(
        key="10.0.0.1/GPU0", baseline_mib=500.0, peak_mib=9000.0, after_mib=500.0, back_at_baseline=back, actors=1
    )
    actor = ray_module.ActorRecord(
        actor_id="a" * 32, pid=123, node="10.0.0.1", gpu="0", device="cuda:0", status=status, documents=10
    )
    return ray_module.JobSummary(documents=10, failed=0, seconds=5.0, actors=(actor,), gpus=(gpu,))


def test_the_summary_is_ok_only_when_every_gpu_is_back_and_no_actor_is_left() -> None:
    good = _summary(back=True)
    assert good.ok
    assert good.documents_per_s == 2.0
    assert "back at baseline" in str(good)
    assert not _summary(back=False).ok
    assert "NOT back at baseline" in str(_summary(back=False))
    assert _summary(back=None).ok, "nothing to measure is not a failure"
    assert not _summary(back=True, status="running").ok
    died = _summary(back=True, status="died")
    assert died.ok
    assert died.deaths == 1


class _Reading:
    def __init__(self, used_mib: float) -> None:
        self.used_mib = used_mib


def test_settle_waits_for_the_processes_then_for_each_card_to_come_back() -> None:
    # The driver frees a dead process's memory a little later: a card read once at the exit still
    # shows it. settle() keeps reading until the card is within tolerance of its baseline.
    from mineru_vram._ray.report import settle

    alive = iter([[7], [7], [], [], [], []])
    used = iter([1313.0, 1313.0, 620.0, 620.0])
    left, back = settle(
        lambda: next(alive, []),
        lambda: {"0": _Reading(next(used, 620.0))},
        {"0": 615.0},
        tolerance=64.0,
        timeout=5.0,
        interval=0.0,
    )
    assert left == []
    assert set(back) == {"0"}
    assert back["0"] >= 0.0


def test_settle_gives_up_at_its_bound_and_says_which_cards_did_not_come_back() -> None:
    from mineru_vram._ray.report import settle

    left, back = settle(
        list,
        lambda: {"0": _Reading(620.0), "1": _Reading(1313.0)},
        {"0": 615.0, "1": 615.0},
        tolerance=64.0,
        timeout=0.2,
        interval=0.01,
    )
    assert left == []
    assert set(back) == {"0"}, "card 1 never came back, so it has no time"
    left, _ = settle(lambda: [42], dict, {}, tolerance=0.0, timeout=0.1, interval=0.01)
    assert left == [42], "a process still alive at the bound is returned"


def test_a_card_not_back_names_the_processes_that_hold_it() -> None:
    gpu = ray_module.GpuRecord(
        key="10.0.0.1/GPU0",
        baseline_mib=615.0,
        peak_mib=9000.0,
        after_mib=1313.0,
        back_at_baseline=False,
        actors=1,
        holders=((4242, 698.0, "ray::IDLE"),),
    )
    actor = ray_module.ActorRecord(
        actor_id="a" * 32, pid=123, node="10.0.0.1", gpu="0", device="cuda:0", status="closed", documents=10
    )
    text = str(ray_module.JobSummary(documents=10, failed=0, seconds=5.0, actors=(actor,), gpus=(gpu,)))
    assert "NOT back at baseline" in text
    assert "held by pid 4242 (698 MiB): ray::IDLE" in text


@pytest.mark.parametrize("on_open_thread", [False, True])
def test_the_actor_pool_runs_one_call_at_a_time_on_the_thread_asked_for(
    monkeypatch: pytest.MonkeyPatch, on_open_thread: bool
) -> None:
    # bench_ray's "@pool" phases flip this switch; the pool's size and one call at a time stay.
    monkeypatch.setattr(ray_module, "_PARSE_ON_OPEN_THREAD", on_open_thread)
    pool = ray_module._actor_pool((1, 3))
    assert (pool.min_size, pool.max_size) == (1, 3)
    assert pool.max_concurrent_calls_per_actor is None  # Ray's default: one call at a time
    assert bool(getattr(pool, "_enable_true_multi_threading", False)) is on_open_thread


def test_by_default_an_actor_parses_on_its_task_thread_one_call_at_a_time() -> None:
    # Ray Data's own default runs a callable class in a pool thread, where the parse ran slower.
    pool = ray_module._actor_pool(2)
    assert (pool.min_size, pool.max_size) == (2, 2)
    assert pool.enable_true_multi_threading is True
    assert pool.max_concurrent_calls_per_actor is None  # Ray's max_concurrency 1: one call at a time


def test_a_gpu_whose_node_left_is_reported_unread_and_named_in_a_note() -> None:
    gpu = ray_module.GpuRecord(
        key="10.0.0.2/GPU0", baseline_mib=500.0, peak_mib=9000.0, after_mib=None, back_at_baseline=None, actors=1
    )
    actor = ray_module.ActorRecord(
        actor_id="b" * 32, pid=7, node="10.0.0.2", gpu="0", device="cuda:0", status="died", node_id="c" * 56
    )
    note = "node cccccccc (10.0.0.2) left the cluster during the job: its actors died with it"
    summary = ray_module.JobSummary(documents=3, failed=0, seconds=1.0, actors=(actor,), gpus=(gpu,), notes=(note,))
    text = str(summary)
    assert "10.0.0.2/GPU0: baseline 500 MiB, peak 9000 MiB, not read after the job (see the notes)" in text
    assert f"note: {note}" in text
    assert "(node cccccccc)" not in text, "one node at that address: its address names it"
    assert summary.ok, "an unread GPU of a node that left is not a failure; the note says why"
