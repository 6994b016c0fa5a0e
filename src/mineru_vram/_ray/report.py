"""The job report: what the actors reported, the probe of each node after the job, the summary."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mineru_vram import ReleaseReport

__all__ = ["ActorRecord", "GpuRecord", "JobReport", "JobSummary"]


class _CollectorActor:
    """Holds what each actor incarnation (actor id, pid) reported: start, progress, close."""

    def __init__(self) -> None:
        self.actors: dict[tuple[str, int], dict[str, Any]] = {}

    def started(self, key: tuple[str, int], info: dict[str, Any]) -> None:
        self.actors[key] = {"info": info, "progress": {}, "closed": False, "receipt": None}

    def progress(self, key: tuple[str, int], progress: dict[str, Any]) -> None:
        if key in self.actors:
            self.actors[key]["progress"] = progress

    def closed(self, key: tuple[str, int], progress: dict[str, Any], receipt: ReleaseReport | None) -> None:
        if key in self.actors:
            self.actors[key].update(progress=progress, closed=True, receipt=receipt)

    def state(self) -> dict[tuple[str, int], dict[str, Any]]:
        return self.actors


_Collector: Any = ray.remote(num_cpus=0)(_CollectorActor)


@ray.remote(num_cpus=0)
def _node_probe(
    pids: list[int], gpus: list[str], wait: float, baselines: dict[str, float] | None = None, tolerance: float = 0.0
) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """On one node: wait for ``pids`` to exit and each GPU to come back, within ``wait`` s in all.

    Returns the pids still alive and, per GPU (Ray's id, read as an NVML index, as
    ``vram_snapshot`` reads such entries), its used MiB, the seconds it took to come back
    within ``tolerance`` of ``baselines[gpu]`` after the processes were gone, and the
    processes NVML lists on it at the end (so memory still held names its holder).
    """
    import psutil

    def alive(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    from mineru_vram._probe import card_memory, holders

    def read() -> dict[str, Any]:
        cards = {gpu: card_memory(int(gpu)) for gpu in gpus}
        return {gpu: info for gpu, info in cards.items() if info is not None}

    left, settled = settle(
        lambda: [p for p in pids if alive(p)], read, baselines or {}, tolerance=tolerance, timeout=wait
    )
    used = {
        gpu: {"used_mib": info.used_mib, "seconds_to_baseline": settled.get(gpu), "holders": holders(info)}
        for gpu, info in read().items()
    }
    return left, used


def settle(
    alive: Callable[[], list[int]],
    read: Callable[[], Mapping[str, Any]],
    baselines: Mapping[str, float],
    *,
    tolerance: float,
    timeout: float,
    interval: float = 0.1,
) -> tuple[list[int], dict[str, float]]:
    """Wait until no process of ``alive()`` is left and every device ``read()`` returns
    (objects with ``used_mib``) is within ``tolerance`` of its baseline, or ``timeout`` passes.

    The driver frees a process's memory a little after the process is gone, so one reading
    at the moment of exit can still show it. Returns the processes still alive and, for each
    device that came back, the seconds from the processes' exit to its return.
    """
    start = time.monotonic()
    gone_at: float | None = None
    back: dict[str, float] = {}
    while True:
        left = alive()
        now = time.monotonic()
        if not left:
            gone_at = now if gone_at is None else gone_at
            for gpu, info in read().items():
                if gpu not in back and gpu in baselines and info.used_mib <= baselines[gpu] + tolerance:
                    back[gpu] = round(now - gone_at, 3)
            if all(gpu in back for gpu in baselines):
                return [], back
        if now - start >= timeout:
            return left, back
        time.sleep(interval)


@dataclass(frozen=True)
class ActorRecord:
    """One actor process of the job, as it reported itself.

    Attributes:
        actor_id: Ray's actor id (a restarted actor keeps it, in a new process).
        pid: the process.
        node: the node's IP address.
        gpu: Ray's GPU id(s) on the node ("" on the CPU).
        device: the session's device in that process.
        status: ``"closed"`` (the session was released), ``"died"`` (the process is gone
            without closing: killed, out of memory, node lost), ``"running"`` (neither,
            when the summary gave up waiting).
        documents: documents it finished (failed ones included).
        failed: of those, the ones that became error rows.
        load_seconds: time to open the session.
        peak_process_mib: the process's peak GPU memory by NVML (sampled).
        receipt: the session's :class:`~mineru_vram.ReleaseReport` (``closed`` only).
        node_id: Ray's id of the node (several nodes can share an address: containers on
            one host's network, a test cluster on one machine).
    """

    actor_id: str
    pid: int
    node: str
    gpu: str
    device: str
    status: str
    documents: int = 0
    failed: int = 0
    load_seconds: float = 0.0
    peak_process_mib: float | None = None
    receipt: ReleaseReport | None = None
    node_id: str = ""


@dataclass(frozen=True)
class GpuRecord:
    """One GPU (or one node's CPU) of the job.

    Attributes:
        key: ``"<node>/GPU<id>"`` (``"<node>/cpu"`` for CPU actors); where nodes share an
            address, ``"<node>#<first 8 of the node id>/GPU<id>"``, so two nodes' cards stay apart.
        baseline_mib: device memory used before the job's first session on it loaded
            (NVML, the lowest reading of the actors that opened there).
        peak_mib: the highest device memory used while the job ran (sampled).
        after_mib: device memory used once the job's actors on it had exited.
        back_at_baseline: ``after_mib`` within the tolerance of ``baseline_mib``
            (``None`` where there is nothing to measure: a CPU, no NVML).
        actors: actor processes that ran on it.
        seconds_to_baseline: from the last of its actors' exit to its memory being back
            (``None`` where it did not come back or there is nothing to measure).
        holders: the processes NVML listed on it at the end, as (pid, MiB, command line);
            where it is not back at baseline, these hold the memory.
    """

    key: str
    baseline_mib: float | None
    peak_mib: float | None
    after_mib: float | None
    back_at_baseline: bool | None
    actors: int
    seconds_to_baseline: float | None = None
    holders: tuple[tuple[int, float, str], ...] = ()


@dataclass(frozen=True)
class JobSummary:
    """What a :class:`JobReport` saw of one or more runs of a parse job.

    Attributes:
        documents: documents the actors finished (error rows included). After an actor
            died, a document it was parsing at that moment can be counted by it and by
            its retry; the Dataset itself holds each document once.
        failed: of those, the error rows.
        seconds: from the first document's start to the last one's end.
        actors: every actor process, restarted ones included.
        gpus: every device used, with its peak and whether it is back at its baseline.
    """

    documents: int
    failed: int
    seconds: float
    actors: tuple[ActorRecord, ...] = ()
    gpus: tuple[GpuRecord, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def documents_per_s(self) -> float | None:
        return self.documents / self.seconds if self.seconds > 0 else None

    @property
    def deaths(self) -> int:
        """Actor processes that died without closing their session."""
        return sum(1 for a in self.actors if a.status == "died")

    @property
    def ok(self) -> bool:
        """Every session closed or died (none left running), every receipt clean, every GPU back at baseline."""
        if any(a.status == "running" for a in self.actors):
            return False
        if any(a.receipt is not None and not a.receipt.ok for a in self.actors):
            return False
        return all(g.back_at_baseline is not False for g in self.gpus)

    def __str__(self) -> str:
        rate = self.documents_per_s
        lines = [
            f"{self.documents} documents ({self.failed} failed) in {self.seconds:.1f} s"
            + (f", {rate:.2f} documents/s" if rate is not None else "")
            + f"; {len(self.actors)} actor processes ({self.deaths} died); "
            + ("ok" if self.ok else "NOT OK")
        ]
        for g in self.gpus:
            if g.back_at_baseline is None and g.baseline_mib is not None:  # a GPU whose node left
                lines.append(
                    f"  {g.key}: baseline {_mib(g.baseline_mib)}, peak {_mib(g.peak_mib)}, not read after the job"
                    f" (see the notes); {g.actors} actor(s)"
                )
            elif g.back_at_baseline is None:
                lines.append(f"  {g.key}: {g.actors} actor(s), no GPU memory to measure")
            else:
                lines.append(
                    f"  {g.key}: baseline {_mib(g.baseline_mib)}, peak {_mib(g.peak_mib)}, after {_mib(g.after_mib)}"
                    f" ({'back at baseline' if g.back_at_baseline else 'NOT back at baseline'}); {g.actors} actor(s)"
                )
                if not g.back_at_baseline:
                    lines += [f"    held by pid {pid} ({mib:.0f} MiB): {cmd}" for pid, mib, cmd in g.holders]
        # an actor's node is named where its address is ambiguous
        shared = _nodes_per_address({a.node_id: a.node for a in self.actors})
        for a in self.actors:
            lines.append(
                f"  actor {a.actor_id[:8]} pid {a.pid} on {a.node}"
                + (f" (node {a.node_id[:8]})" if a.node_id and shared.get(a.node, 0) > 1 else "")
                + f" {a.device}: {a.status}, "
                f"{a.documents} documents, loaded in {a.load_seconds:.1f} s"
                + ("" if a.receipt is None else f"; receipt {'ok' if a.receipt.ok else 'NOT OK'}")
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


class JobReport:
    """Collects the figures and release receipts of a parse job's actors.

    Pass it to :func:`parse_dataset` (``report=``); after the Dataset was consumed,
    :meth:`summary` waits for the pool's actors to close their sessions and exit, and
    sums up. It starts a small Ray actor of its own (no CPU, no GPU) that lives as long
    as this object.

    Args:
        tolerance_mib: how far above its baseline a GPU may be after the job and still
            count as back at baseline.
    """

    def __init__(self, *, tolerance_mib: float = 64.0) -> None:
        # On this process's node, so that it lives as long as the driver does: placed anywhere,
        # it could die with a worker node that leaves mid-job and take every actor's figures along.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.collector = _Collector.options(scheduling_strategy=here).remote()
        self.tolerance_mib = tolerance_mib

    def summary(self, *, timeout: float = 60.0, grace: float = 10.0) -> JobSummary:
        """Wait (at most ``timeout`` s) for every actor to close or die, then sum up.

        An actor process that has not closed its session within ``grace`` s is checked
        on its node: one that is gone died. Those still there when ``timeout`` passes are
        listed as ``"running"`` (and the summary is not ``ok``).
        """
        start = time.monotonic()
        deadline = start + timeout
        dead: set[tuple[str, int]] = set()
        while True:
            state: dict[tuple[str, int], dict[str, Any]] = ray.get(self.collector.state.remote(), timeout=timeout)
            latest = set(_latest_incarnations(state).values())
            # An incarnation replaced by a restart died; the latest one of each actor closes
            # its session when the pool shuts down, unless it died too.
            dead |= {key for key, entry in state.items() if key not in latest and not entry["closed"]}
            pending = [key for key in latest if not state[key]["closed"] and key not in dead]
            now = time.monotonic()
            if pending and now - start >= grace:
                dead |= self._gone(pending, state)
                pending = [key for key in pending if key not in dead]
            if not pending or now >= deadline:
                break
            time.sleep(0.2)
        return self._summarise(state, dead, max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _gone(keys: Sequence[tuple[str, int]], state: Mapping[tuple[str, int], dict[str, Any]]) -> set[tuple[str, int]]:
        """Of ``keys``, the incarnations whose process no longer exists on its node."""
        by_node: dict[str, list[int]] = {}
        for key in keys:
            by_node.setdefault(state[key]["info"]["node_id"], []).append(key[1])
        alive: set[int] = set()
        nodes = _alive_nodes()
        for node_id, pids in by_node.items():
            probed = _probe(node_id, nodes, pids, [], 0.0)
            if probed is not None:  # a node that left the cluster took its processes with it
                alive.update(probed[0])
        return {key for key in keys if key[1] not in alive}

    def _summarise(
        self, state: dict[tuple[str, int], dict[str, Any]], dead: set[tuple[str, int]], wait: float
    ) -> JobSummary:
        actors: list[ActorRecord] = []
        by_device: dict[str, list[dict[str, Any]]] = {}
        documents = failed = 0
        first: float | None = None
        last: float | None = None
        addresses = {entry["info"]["node_id"]: entry["info"]["node"] for entry in state.values()}
        nodes_at = _nodes_per_address(addresses)  # an address of several nodes names each node
        for key, entry in sorted(state.items(), key=lambda kv: kv[1]["info"]["started"]):
            info, progress = entry["info"], entry["progress"]
            status = "closed" if entry["closed"] else ("died" if key in dead else "running")
            actors.append(
                ActorRecord(
                    actor_id=info["actor_id"],
                    pid=info["pid"],
                    node=info["node"],
                    gpu=info["gpu"],
                    device=info["device"],
                    status=status,
                    documents=progress.get("documents", 0),
                    failed=progress.get("failed", 0),
                    load_seconds=info["load_seconds"],
                    peak_process_mib=progress.get("peak_process_mib"),
                    receipt=entry["receipt"],
                    node_id=info["node_id"],
                )
            )
            documents += progress.get("documents", 0)
            failed += progress.get("failed", 0)
            if progress.get("first_start") is not None:
                first = progress["first_start"] if first is None else min(first, progress["first_start"])
                last = progress["last_end"] if last is None else max(last, progress["last_end"])
            node = info["node"] if nodes_at[info["node"]] == 1 else f"{info['node']}#{info['node_id'][:8]}"
            device_key = f"{node}/" + (f"GPU{info['gpu']}" if info["gpu"] else "cpu")
            by_device.setdefault(device_key, []).append({**info, **progress})
        gpus, lost = self._gpu_records(by_device, wait)
        notes = tuple(
            f"node {node_id[:8]} ({addresses[node_id]}) left the cluster during the job: its actors died with it "
            "and its devices could not be read after"
            for node_id in sorted(lost)
        )
        return JobSummary(
            documents=documents,
            failed=failed,
            seconds=0.0 if first is None or last is None else last - first,
            actors=tuple(actors),
            gpus=tuple(gpus),
            notes=notes,
        )

    def _gpu_records(self, by_device: dict[str, list[dict[str, Any]]], wait: float) -> tuple[list[GpuRecord], set[str]]:
        """Each device's record, and the nodes that could not be probed (gone from the cluster).

        After the job, one probe per node waits for the job's processes there to exit and its
        GPUs to come back, then reads each GPU, so a CUDA context still held (and its holder)
        shows.
        """
        nodes: dict[str, tuple[set[int], set[str], dict[str, float]]] = {}
        baselines: dict[str, float | None] = {}
        for key, rows in by_device.items():
            readings = [r["baseline_device_mib"] for r in rows if r.get("baseline_device_mib") is not None]
            base = baselines[key] = min(readings) if readings else None
            for r in rows:
                pids, gpus, known = nodes.setdefault(r["node_id"], (set(), set(), {}))
                pids.add(r["pid"])
                for g in filter(None, r["gpu"].split(",")):
                    gpus.add(g)
                    if base is not None:
                        known[g] = min(known.get(g, base), base)
        after: dict[tuple[str, str], dict[str, Any]] = {}
        lost: set[str] = set()
        alive = _alive_nodes()
        for node_id, (pids, gpus, known) in nodes.items():
            probed = _probe(node_id, alive, sorted(pids), sorted(gpus), wait, known, self.tolerance_mib)
            if probed is None:
                lost.add(node_id)
                continue
            after.update({(node_id, g): reading for g, reading in probed[1].items()})
        records = []
        for key, rows in sorted(by_device.items()):
            peaks = [r["peak_device_mib"] for r in rows if r.get("peak_device_mib") is not None]
            gpu_ids = rows[0]["gpu"].split(",") if rows[0]["gpu"] else []
            readings = [after[(rows[0]["node_id"], g)] for g in gpu_ids if (rows[0]["node_id"], g) in after]
            baseline = baselines[key]
            after_mib = max(r["used_mib"] for r in readings) if readings else None
            back = None if baseline is None or after_mib is None else after_mib <= baseline + self.tolerance_mib
            settled = [r["seconds_to_baseline"] for r in readings]
            records.append(
                GpuRecord(
                    key=key,
                    baseline_mib=baseline,
                    peak_mib=max(peaks) if peaks else None,
                    after_mib=after_mib,
                    back_at_baseline=back,
                    actors=len(rows),
                    seconds_to_baseline=max(settled) if back and settled and None not in settled else None,
                    holders=tuple(tuple(h) for r in readings for h in r["holders"]),  # type: ignore[misc]
                )
            )
        return records, lost


def _latest_incarnations(state: Mapping[tuple[str, int], dict[str, Any]]) -> dict[str, tuple[str, int]]:
    latest: dict[str, tuple[str, int]] = {}
    for key, entry in state.items():
        current = latest.get(key[0])
        if current is None or entry["info"]["started"] > state[current]["info"]["started"]:
            latest[key[0]] = key
    return latest


def _nodes_per_address(addresses: Mapping[str, str]) -> collections.Counter[str]:
    """How many nodes share each address (``addresses``: node id -> address).

    Containers on one host's network and test clusters on one machine put several nodes at one
    address; there a device or an actor is named by its node id too.
    """
    return collections.Counter(addresses.values())


def _alive_nodes() -> set[str]:
    """The ids of the cluster's nodes that are alive now (one question to the GCS)."""
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}  # type: ignore[no-untyped-call]


def _probe(node_id: str, alive: set[str], pids: Sequence[int], gpus: Sequence[str], wait: float, *args: Any) -> Any:
    """:func:`_node_probe` run on ``node_id``; ``None`` where that node has left the cluster.

    ``alive``: :func:`_alive_nodes`, asked once by the caller for all its probes. Bounded:
    ``wait`` s for the probe's own wait, plus 60 s for Ray to place and run it.
    """
    if node_id not in alive:
        return None
    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    try:
        return ray.get(
            _node_probe.options(scheduling_strategy=strategy).remote(pids, gpus, wait, *args), timeout=wait + 60
        )
    except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
        return None  # the node left between the check and the probe
