"""Placement: a VramBudget as Ray's ``num_gpus``, and the cluster's GPUs."""

from __future__ import annotations

import math

import ray

from mineru_vram import ConfigurationError, ModelSession, VramBudget, vram_snapshot

__all__ = ["budget_of", "cluster_gpus", "gpu_share", "placement"]


def gpu_share(budget: VramBudget, *, gpu_memory_mib: float | None = None) -> float:
    """The fraction of a GPU a budget needs, as Ray's ``num_gpus``.

    A fraction budget is its fraction; a MiB budget is divided by the card's memory
    (``gpu_memory_mib``, else what NVML reports for this machine's first GPU). The
    budget's ``headroom_mib`` counts too. Rounded up to a hundredth, so two actors of
    0.5 share a card and a card is never promised more than it has.

    Raises:
        ConfigurationError: a MiB budget where the card's size is unknown, or a budget
            above one card.
    """
    if gpu_memory_mib is None:
        gpu_memory_mib = vram_snapshot(0).total_mib if budget.mib is not None or budget.headroom_mib else None
    if budget.fraction is not None:
        share = budget.fraction + (budget.headroom_mib / gpu_memory_mib if gpu_memory_mib else 0.0)
    else:
        if not gpu_memory_mib:
            raise ConfigurationError(
                f"{budget} is in MiB and this machine sees no GPU to size it against: pass "
                "gpu_memory_mib= (the memory of the cluster's cards) or a fraction budget",
                budget=str(budget),
            )
        assert budget.mib is not None
        share = (budget.mib + budget.headroom_mib) / gpu_memory_mib
    share = math.ceil(round(share * 100, 6)) / 100
    if share > 1:
        raise ConfigurationError(
            f"{budget} needs {share:.2f} of a GPU: one session runs on one card", budget=str(budget)
        )
    return share


def budget_of(value: VramBudget | int | float | str | None) -> VramBudget | None:
    """A ``budget=`` argument read by the rules of ModelSession's (MiB, fraction, ``"6GiB"``, ``"25%"``)."""
    if value is None or isinstance(value, VramBudget):
        return value
    # An unopened session loads nothing: it is only asked how it reads the argument.
    return ModelSession("flash", device="cpu", budget=value, trust_env=False).budget


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]


def placement(
    budget: VramBudget | int | float | str | None, num_gpus: float | None, gpu_memory_mib: float | None
) -> tuple[VramBudget | None, float]:
    """The budget read from a ``budget=`` argument, and the actor's ``num_gpus``.

    ``num_gpus`` when given; else :func:`gpu_share` of the budget, else 1 where the cluster
    has GPUs and 0 where it has none.
    """
    read = budget_of(budget)
    if num_gpus is not None:
        return read, num_gpus
    if read is not None:
        return read, gpu_share(read, gpu_memory_mib=gpu_memory_mib)
    return read, 1.0 if cluster_gpus() > 0 else 0.0
