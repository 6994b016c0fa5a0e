"""Sizing an engine from its budget, and admitting it: waiting for its memory and reserving it.

Free means NVML's figure less what other mineru-vram processes reserved in the
machine's ledger and have not allocated yet (:mod:`mineru_vram._budget`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mineru_vram._budget import Ledger, MemoryProbe, Reservation, VramBudget, admit, holders_text
from mineru_vram._exceptions import AdmissionTimeoutError, EngineAdmissionError, EngineStartError
from mineru_vram._probe import MIB, DeviceMemory

from .backends.base import EngineTraits
from .settings import EngineSettings

__all__ = ["Sizing", "admit_engine", "size_engine", "weights_mib"]


@dataclass(frozen=True)
class Sizing:
    """What a budget means for one engine on one card.

    Attributes:
        mem_fraction: the fraction the server is started with (pool-fraction engines), or ``None``.
        need_mib: what admission waits for and reserves; ``None``: nothing to admit.
        total_mib: the card's total, by NVML.
        budget_mib: the device memory the budget allows the engine (``None``: no budget).
    """

    mem_fraction: float | None
    need_mib: float | None
    total_mib: float | None = None
    budget_mib: float | None = None


def weights_mib(model_path: str | None) -> float | None:
    """The model's weight files on disk (``*.safetensors``, ``*.bin``, ``*.gguf``), in MiB."""
    if not model_path:
        return None
    root = Path(model_path)
    if not root.is_dir():
        return None
    suffixes = (".safetensors", ".bin", ".gguf")
    total = sum(p.stat().st_size for p in root.iterdir() if p.suffix in suffixes and p.is_file())
    return total / MIB if total else None


def size_engine(settings: EngineSettings, traits: EngineTraits, probe: MemoryProbe) -> Sizing:
    """Turn the engine's budget into a memory fraction and the MiB admission must find free.

    An engine that sizes itself (``traits.device_need``) is asked what it will take
    within the budget; admission then waits for the whole budget, or, without one,
    for what the engine said.

    Raises:
        EngineStartError: NVML cannot read the device a budget needs, or the weights do
            not fit the budget.
        ConfigurationError: a budget not below the card's total.
    """
    s = settings
    if not traits.launched or s.device == "cpu":
        return Sizing(s.mem_fraction, None)  # nothing to size, check or reserve on a device
    weights = weights_mib(s.model_path)
    info = probe(s.device)
    total = None if info is None else info.total_mib
    budget = s.budget
    if budget is None and s.vram_budget_gib is not None:
        budget = VramBudget(mib=s.vram_budget_gib * 1024, timeout=0.0)
    fraction = s.mem_fraction
    need_mib: float | None = None
    if traits.pool_fraction:
        if budget is not None:
            if total is None:
                raise EngineStartError(
                    f"cannot turn a budget into --mem-fraction-static: NVML cannot read {s.device}; "
                    "pass mem_fraction= instead",
                    device=s.device,
                )
            # Rounded down: the fraction never asks the server for more than the budget.
            fraction = budget.engine_fraction(total)
        taken = fraction if fraction is not None else traits.default_fraction
        if taken is not None and total is not None:
            need_mib = taken * total
    elif traits.device_need is not None:
        budget_mib = None if budget is None else budget.need_mib(total)
        planned = traits.device_need(s, budget_mib)
        need_mib = planned if budget_mib is None else budget_mib
        return Sizing(fraction, need_mib, total, budget_mib)
    elif budget is not None:
        need_mib = budget.need_mib(total)
    elif weights is not None:
        need_mib = weights  # the weights, plus the headroom
    if need_mib is not None and weights is not None and traits.pool_fraction and weights >= need_mib:
        raise EngineStartError(
            f"the model's weights ({weights / 1024:.1f} GiB on disk) do not fit the "
            f"{need_mib / 1024:.1f} GiB budget on {s.device}, which must also hold the KV cache",
            needed_mib=weights,
            budget_mib=need_mib,
        )
    return Sizing(fraction, need_mib, total)


def admit_engine(
    settings: EngineSettings, need_mib: float, *, probe: MemoryProbe, ledger: Ledger | None
) -> Reservation:
    """Wait until the device has ``need_mib`` (plus the headroom) free, and reserve it in the ledger.

    The wait lasts ``budget.timeout`` (none without ``budget=``).

    Raises:
        EngineAdmissionError: the memory was not free in time; the message says what
            NVML saw, what others reserved and who holds the memory.
    """
    s = settings
    # budget= waits for its timeout at its poll interval; vram_budget_gib, mem_fraction and no budget do not wait.
    budget = dataclasses.replace(
        s.budget or VramBudget(mib=need_mib, timeout=0.0),
        mib=need_mib,
        fraction=None,
        headroom_mib=s.headroom_gib * 1024,
        probe=probe,
    )
    try:
        return admit(
            budget,
            s.device,
            what=f"the {s.engine} engine",
            ledger=ledger,
            pids=(),  # its server does not exist yet: all it will hold is spent from the reservation
        )
    except AdmissionTimeoutError as exc:
        info: DeviceMemory = exc.device_info  # the reading admission gave up on
        free, reserved = info.free_mib, float(exc.reserved_mib or 0.0)
        required = need_mib + s.headroom_gib * 1024
        held = holders_text(info, gib=True)
        waited = f" within {budget.timeout:g} s" if budget.timeout else ""
        raise EngineAdmissionError(
            f"not enough free memory on {s.device} ({info.name}) to start the {s.engine} engine{waited}: it needs "
            f"{need_mib / 1024:.1f} GiB plus {s.headroom_gib:g} GiB headroom = {required / 1024:.1f} GiB, and "
            f"NVML reports {free / 1024:.1f} GiB free of {info.total_mib / 1024:.1f} GiB"
            + (f", of which other mineru-vram processes reserved {reserved / 1024:.1f} GiB" if reserved else "")
            + f" ({(free - reserved - required) / 1024:+.1f} GiB)."
            + (f" Holding memory: {held}." if held else "")
            + " Lower the budget, free the device, or give budget= a timeout to wait.",
            device=s.device,
            need_mib=need_mib,
            needed_mib=required,
            free_mib=free,
            reserved_mib=reserved,
        ) from exc
