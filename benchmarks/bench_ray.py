"""Ray scale-out: parse_dataset on 1 GPU, then on 2 GPUs, against a plain ModelSession loop on 1 GPU.

One run, three phases, each in processes of its own so the cards' memory is read clean
between them (this script only reads NVML; it never creates a CUDA context):

1. ``loop``: a child process opens ``ModelSession`` on the first card and parses the
   documents one after another (the baseline: no Ray);
2. ``ray_1gpu``: ``parse_dataset`` with one actor (``num_gpus=1``) on a local Ray;
3. ``ray_2gpu``: the same with two actors, one per card;
4. ``loop_after`` (when named in ``--phases``): the loop again; the Ray-against-loop ratio then
   uses the two loops' mean, so the machine's drift over the run is not counted as Ray's cost.

A phase named again takes a ``#N`` (``loop,ray_1gpu,loop#2,ray_1gpu#2,loop#3``): loops and Ray
then alternate, each Ray phase is compared with the loops on either side of it, and the ratio is
the median of those pairs. On a shared machine the loops alone drifted by up to 30 % within a
run (run H, docs/BENCHMARKS.md), more than the 5 % being judged; ``loop_spread`` says by how much.

``paired`` (``paired!0``: the actor at niceness 0) takes the drift out altogether: the loop's process and a Ray
actor (``parser_actor``) both hold their models, and each document goes to one and then the other, the order
alternating. ``ray_vs_loop`` is the loop's seconds over Ray's for the same documents, with a 95 % interval of the
per-document ratios' mean; Ray's call is counted (``outside_parse_ms_per_doc``), Ray Data's streaming between
documents is not (a Ray phase's ``steady_gap_s_per_doc`` gives that). Runs J and K in docs/BENCHMARKS.md.

Variants of a Ray phase: ``ray_1gpu/15`` gives the actor 15 CPUs; ``ray_1gpu@pool`` runs each call
in Ray Data's one-thread pool, its default for a callable class (``mineru_vram.ray`` runs them on
the actor's task thread, ``@open``); ``ray_1gpu!0`` starts the actor at niceness 0 (Ray's workers
run at 15). Each phase records the cores its processes kept busy (``cpu_cores``: the parsing
process and its children, the driver, Ray's other processes), and the share of its window spent
inside ``parse`` (``steady_busy_share``): figures that the drift between phases does not touch.

Every phase parses the same ``--docs`` one-page documents (generated text PDFs, or
``--corpus`` PDFs cycled and cut to their first page), with ``preload="all"`` so that no
model loads inside the timed window. Rates are documents over the parsing window (first
document's start to the last one's end, as the sessions measured it); the wall rate of a
Ray phase (from submitting to the last row, actor start-up included) is given beside it.
The comparisons use the steady rates: each worker's first document (its warm-up: CUDA
kernels, caches, MinerU's render workers) left out of the count and the window, so that a
cold start paid once per worker does not count twice as much on two GPUs as on one.
Each Ray actor gets ``--cpus-per-actor`` CPUs (Ray sets its ``OMP_NUM_THREADS`` to that)
and so does the loop's process, so both parse under the same thread count.

The JSON says: per phase the rate, errors, documents lost or duplicated (Ray), the job
summary (per-GPU peak, back at baseline, release receipts), each card's memory by NVML
before and after the phase (read until it is back, up to ``--settle-timeout``, naming the
processes that still hold it if it is not); then ``ratio_2gpu_vs_1gpu`` (target at least 1.9),
``ray_1gpu_vs_loop`` (target at least 0.95) and whether every card is back at its
baseline and no document was lost.

With ``--profile DIR``, ``py-spy`` samples each phase's parsing process (the loop's child, the
first Ray actor) for ``--profile-seconds`` and the JSON gets each function's share of the samples,
overall and inside ``ModelSession.parse``: where a document's time goes on each side.

Usage (GPU machine with two cards; random-weight models are written if missing):

    python benchmarks/bench_ray.py --models-dir /tmp/mv-models --docs 200 --out ray.json
    python benchmarks/bench_ray.py --docs 4 --device cpu        # CPU smoke run (1 then 2 CPU actors)
    python benchmarks/bench_ray.py --docs 50 --phases paired,paired#2 --cpus-per-actor 16 --out ray.json
    python benchmarks/bench_ray.py --docs 80 --phases loop,ray_1gpu,loop_after --cpus-per-actor 16 \
        --profile /tmp/prof --py-spy /tmp/site/bin/py-spy --out ray.json   # one GPU, with profiles
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TOLERANCE_MIB = 64.0


# --- cards, read by NVML only ------------------------------------------------------------------


def _cards() -> list[int]:
    """The physical GPUs (NVML indices) this run may use: CUDA_VISIBLE_DEVICES's, else all NVML sees."""
    from mineru_vram._config import visible_devices
    from mineru_vram._probe import nvml_device_count

    visible = visible_devices()
    if visible is not None and all(v.isdigit() for v in visible):
        return [int(v) for v in visible]
    return list(range(nvml_device_count()))


def _used(cards: list[int]) -> dict[str, float | None]:
    """Used MiB per physical card, by NVML index.

    NVML numbers cards physically and ignores ``CUDA_VISIBLE_DEVICES``; reading them through a
    ``cuda:N`` ordinal (run E3 did) maps ``cuda:2`` under ``CUDA_VISIBLE_DEVICES=2,3`` to no card.
    """
    from mineru_vram._probe import card_memory

    return {str(card): None if (info := card_memory(card)) is None else round(info.used_mib, 1) for card in cards}


class CardSampler:
    """Each card's used memory every ``interval`` seconds; the peak per phase."""

    def __init__(self, cards: list[int], interval: float = 0.5) -> None:
        self.cards = cards
        self.interval = interval
        self.peaks: dict[str, dict[str, float]] = {}
        self.phase = "idle"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cards", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            peaks = self.peaks.setdefault(self.phase, {})
            for card, used in _used(self.cards).items():
                if used is not None:
                    peaks[card] = max(peaks.get(card, 0.0), used)

    def __enter__(self) -> CardSampler:
        if self.cards:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class TreeCpu:
    """CPU seconds used by this script's process tree per phase, process by process (psutil).

    Ray's own processes (GCS, raylet, idle workers) and the driver's Ray Data executor share the
    machine's cores with the actor's parse; the loop has none of them. Their CPU over a phase is
    a measure of Ray's cost that the machine's drift between phases does not touch.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.phase = "idle"
        self.used: dict[str, dict[int, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        self.parents: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.niceness: dict[int, int] = {}
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    total = times.user + times.system
                    self.parents[proc.pid] = proc.ppid()
                    self.names.setdefault(proc.pid, proc.name())
                    self.niceness[proc.pid] = proc.nice()
            except psutil.Error:
                continue
            self.used[self.phase][proc.pid] += total - self._last.get(proc.pid, 0.0)
            self._last[proc.pid] = total

    def enter(self, phase: str) -> None:
        with self._lock:
            self._sample()  # what ran so far goes to the phase that ends
            if self.phase != "idle":
                self.ended[self.phase] = time.time()
            self.phase = phase
            if phase != "idle":
                self.started[phase] = time.time()

    def cores(self, phase: str, parse_pids: set[int]) -> dict[str, Any] | None:
        """Mean cores used over the phase: by the parsing processes (and their children), the driver, the rest.

        ``others_top`` names the busiest of the rest (Ray's raylet, GCS, idle workers) by process name.
        """
        seconds = self.ended.get(phase, time.time()) - self.started.get(phase, time.time())
        if seconds <= 0:
            return None

        def parse(pid: int) -> bool:
            for _ in range(64):  # up the parent chain: MinerU's render workers count as the parse
                if pid in parse_pids:
                    return True
                if (pid := self.parents.get(pid, 0)) <= 1:
                    return False
            return False

        split = {"parse": 0.0, "driver": 0.0, "others": 0.0}
        others: collections.Counter[str] = collections.Counter()
        for pid, cpu in self.used.get(phase, {}).items():
            kind = "parse" if parse(pid) else "driver" if pid == os.getpid() else "others"
            split[kind] += cpu
            if kind == "others":
                others[self.names.get(pid, "?")] += cpu
        return {
            **{k: round(v / seconds, 3) for k, v in split.items()},
            "others_top": {name: round(cpu / seconds, 3) for name, cpu in others.most_common(4)},
            "parse_niceness": sorted({self.niceness[pid] for pid in parse_pids if pid in self.niceness}),
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _holders(cards: list[int]) -> dict[str, list[tuple[int, float, str]]]:
    """The processes NVML lists on each card, as (pid, MiB, command line)."""
    from mineru_vram._probe import card_memory, holders

    return {str(card): holders(info) if (info := card_memory(card)) else [] for card in cards}


def _cards_phase(cards: list[int], before: dict[str, float | None], wait: float) -> dict[str, Any]:
    """Each card after a phase: read until every card is back within the tolerance (at most ``wait`` s).

    The driver frees a process's memory a little after the process is gone, and Ray's actor
    processes exit a little after the pool shuts down, so one reading at the phase's end can
    still show them. Cards not back name the processes NVML lists on them.
    """
    from mineru_vram._probe import poll_until

    def back(reading: dict[str, float | None]) -> dict[str, bool | None]:
        out: dict[str, bool | None] = {}
        for card, base in before.items():
            now = reading[card]
            out[card] = None if base is None or now is None else now <= base + TOLERANCE_MIB
        return out

    def all_back() -> bool:
        return all(b is not False for b in back(_used(cards)).values())

    met, waited = poll_until(all_back, timeout=wait, interval=0.2)
    after = _used(cards)
    holders = _holders(cards)
    return {
        "before_mib": before,
        "after_mib": after,
        "back_at_baseline": back(after),
        "seconds_to_baseline": round(waited, 2) if met else None,
        "holders_after": holders,
    }


def _steady(spans: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """The rate without each worker's first document (its warm-up: kernels, caches, render workers).

    ``spans`` maps a worker to its documents' (start, end); the window runs from the first
    end of a first document to the last end.
    """
    firsts = [min(s)[1] for s in spans.values() if s]
    ends = [end for s in spans.values() for _, end in s]
    count = sum(max(0, len(s) - 1) for s in spans.values())
    if not firsts or count == 0:
        return {"steady_docs": count, "steady_window_s": None, "steady_docs_per_s": None}
    window = max(ends) - min(firsts)
    # the share of the window the workers spent inside parse: what is left is the harness's own
    # cost between documents (Ray Data's scheduling and transfers, or the loop's bookkeeping),
    # measured inside one phase and so untouched by the machine's drift between phases
    busy = sum(end - start for s in spans.values() for start, end in sorted(s)[1:])
    return {
        "steady_docs": count,
        "steady_window_s": round(window, 3),
        "steady_docs_per_s": round(count / window, 4) if window > 0 else None,
        "steady_busy_share": round(busy / (window * len(firsts)), 4) if window > 0 else None,
        "steady_gap_s_per_doc": round((window * len(firsts) - busy) / count, 4) if window > 0 else None,
    }


def _median_timings(timings: list[dict[str, float]]) -> dict[str, float]:
    """Each phase of the parse (``ParseResult.timings``: MinerU's run, the conversion) at its median."""
    keys = sorted({k for t in timings for k in t})
    return {k: round(statistics.median(t[k] for t in timings if k in t), 4) for k in keys}


# --- documents ---------------------------------------------------------------------------------


def _documents(args: Any, folder: Path) -> tuple[list[dict[str, str]], str | None]:
    """``--docs`` rows of ``name`` and ``path``; the page range to parse (``None``: the whole one-page PDF)."""
    if args.corpus:
        pdfs = sorted(Path(args.corpus).glob("*.pdf"))
        if not pdfs:
            sys.exit(f"no PDFs in {args.corpus}")
        rows = [
            {"name": f"doc-{i:04d}-{pdfs[i % len(pdfs)].name}", "path": str(pdfs[i % len(pdfs)])}
            for i in range(args.docs)
        ]
        return rows, "1"
    from mineru_vram.testing import make_pdf

    rows = []
    for i in range(args.docs):
        path = folder / f"doc-{i:04d}.pdf"
        path.write_bytes(
            make_pdf(1, paragraphs=(f"Document {i}", f"The body of document number {i}.", "A second line."))
        )
        rows.append({"name": f"doc-{i:04d}", "path": str(path)})
    return rows, None


# --- profiles (py-spy), optional ---------------------------------------------------------------


class _Profile:
    """``py-spy record`` of one process for ``--profile-seconds``, summed up by function.

    The loop's process and a Ray actor are sampled the same way (wall clock, idle threads
    included, so waits on the GPU show), so the two summaries say where a document's time
    goes on each side.
    """

    def __init__(self, args: Any, name: str) -> None:
        self.args = args
        self.path = Path(args.profile) / f"{name}.txt" if args.profile else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int) -> None:
        if self.path is None or self.proc is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        argv = [self.args.py_spy, "record", "--pid", str(pid), "--duration", str(self.args.profile_seconds)]
        argv += ["--rate", "100", "--idle", "--nonblocking", "--format", "raw", "--output", str(self.path)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start_later(self, pid: int, delay: float) -> None:
        if self.path is not None:
            threading.Timer(delay, self.start, args=(pid,)).start()

    def finish(self) -> dict[str, Any] | None:
        if self.proc is None or self.path is None:
            return None
        try:
            _, err = self.proc.communicate(timeout=self.args.profile_seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return {"error": "py-spy did not finish"}
        if not self.path.is_file():
            return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
        return _profile_summary(self.path.read_text(encoding="utf-8", errors="replace"))


def _profile_summary(raw: str, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks ("thread;frame;... count") to each function's share of the samples.

    ``inclusive``/``leaf`` count every thread; ``in_parse``/``in_parse_leaf`` only the stacks
    inside ``ModelSession.parse``, as shares of those: where a document's time goes.
    """
    counts: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in ("all", "leaf", "parse", "pleaf")}
    totals = {"all": 0, "parse": 0}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # "func (path/to/file.py:123)" -> "func (file.py)": lines of one function add up
        frames = [_frame(f) for f in stack.split(";")[1:]]  # the first is the process or thread
        parts = ("all", "parse") if "ModelSession.parse (_session.py)" in frames else ("all",)
        for part in parts:
            totals[part] += n
            for frame in set(frames):
                counts[part][frame] += n
            if frames:
                counts["leaf" if part == "all" else "pleaf"][frames[-1]] += n

    def share(part: str, total: int) -> list[tuple[str, float]]:
        return [(f, round(n / total, 4)) for f, n in counts[part].most_common(top)] if total else []

    return {
        "samples": totals["all"],
        "parse_samples": totals["parse"],
        "in_parse": share("parse", totals["parse"]),
        "in_parse_leaf": share("pleaf", totals["parse"]),
        "inclusive": share("all", totals["all"]),
        "leaf": share("leaf", totals["all"]),
    }


def _frame(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')').rsplit(':', 1)[0]).name})" if where else name


# --- the comparisons -----------------------------------------------------------------------------


def _base(phase: str) -> str:
    """A phase's kind: ``loop#2`` is the second ``loop``, ``ray_1gpu#3`` the third ``ray_1gpu``."""
    return phase.partition("#")[0]


def _kind(phase: str) -> str:
    """A phase's kind without its variant: ``ray_1gpu@pool#2`` and ``ray_1gpu/15`` are ``ray_1gpu``."""
    return re.split(r"[/@!]", _base(phase))[0]


def _niceness_options(niceness: int | None) -> dict[str, Any]:
    """Ray actor options that start the actor at ``niceness`` (Ray starts its workers at 15)."""
    return {} if niceness is None else {"runtime_env": {"env_vars": {"RAY_worker_niceness": str(niceness)}}}


def _comparisons(result: dict[str, Any], phases: list[str]) -> dict[str, Any]:
    """The rates compared, without each worker's first document (see _steady).

    Loops and Ray phases may alternate (``loop,ray_1gpu,loop#2,ray_1gpu#2,loop#3``): the machine
    drifts over a run (a shared host's CPUs), and a Ray phase is then compared with the loops
    right before and after it, each pair on its own; the ratio is the pairs' median. The loops'
    spread says how much the machine drifted: a spread above the 5 % being judged makes the
    verdict as uncertain as the drift.
    """
    rate = {p: (result.get(p) or {}).get("steady_docs_per_s") for p in phases}
    loops = [p for p in phases if _base(p) in ("loop", "loop_after") and rate[p]]
    out: dict[str, Any] = {}

    def mean(kind: str) -> float | None:
        rates = [rate[p] for p in phases if _base(p) == kind and rate[p]]
        return statistics.fmean(rates) if rates else None

    loop = statistics.fmean(rate[p] for p in loops) if loops else None
    one, two = mean("ray_1gpu"), mean("ray_2gpu")
    if loop is not None:
        out["loop_mean_docs_per_s"] = round(loop, 4)
        out["loop_spread"] = round((max(rate[p] for p in loops) - min(rate[p] for p in loops)) / loop, 4)
        # every one-GPU phase against all the loops' mean (the threads, the CPUs per actor)
        out["vs_loop"] = {
            p: round(rate[p] / loop, 4)
            for p in phases
            if rate[p] and p not in loops and not _base(p).startswith("ray_2gpu")
        }
    if one and two:
        out["ratio_2gpu_vs_1gpu"] = round(two / one, 4)
    # Each one-GPU phase, of any variant, against the nearest loop on either side of it.
    pairs: dict[str, float] = {}
    for i, p in enumerate(phases):
        if _kind(p) != "ray_1gpu" or not rate[p]:
            continue
        before = next((q for q in reversed(phases[:i]) if q in loops), None)
        after = next((q for q in phases[i + 1 :] if q in loops), None)
        around = [q for q in (before, after) if q]
        if around:
            pairs[p] = round(rate[p] / statistics.fmean(rate[q] for q in around), 4)
    by_variant: dict[str, list[float]] = {}
    for p, ratio in pairs.items():
        by_variant.setdefault(_base(p), []).append(ratio)
    if pairs:
        out["ray_1gpu_vs_adjacent_loops"] = pairs
        out["variants_vs_adjacent_loops"] = {
            v: {"median": round(statistics.median(r), 4), "min": min(r), "max": max(r), "phases": len(r)}
            for v, r in by_variant.items()
        }
    # the paired phases: each document through both sides at the same moment (see _paired_phase)
    paired = {
        p: result[p]["ray_vs_loop"] for p in phases if _kind(p) == "paired" and (result.get(p) or {}).get("ray_vs_loop")
    }
    if paired:
        out["paired_ray_vs_loop"] = paired
    if "ray_1gpu" in by_variant:  # the verdict: the default variant
        out["ray_1gpu_vs_loop"] = round(statistics.median(by_variant["ray_1gpu"]), 4)
    elif one and loop:
        out["ray_1gpu_vs_loop"] = round(one / loop, 4)
    return out


# --- phase 1: the plain loop, in a child process -------------------------------------------------


def _loop_child(config_path: str) -> None:
    """Runs in the child: open one session, parse every document, print one JSON line."""
    from mineru_vram import ModelSession

    cfg = json.loads(Path(config_path).read_text())
    session = ModelSession(
        cfg["backend"],
        device=cfg["device"],
        models_dir=cfg["models_dir"],
        preload="all",
        gc_freeze=cfg["gc_freeze"],
        trust_env=False,
    )
    t0 = time.perf_counter()
    session.open()
    load_s = time.perf_counter() - t0
    if cfg.get("serve"):
        _serve_child(session, cfg, load_s)
        return
    # "loop_thread": each parse in one worker thread, as Ray Data's wrapper runs a callable class
    # (the models loaded on the main thread, the parses on another): the thread's share of Ray's cost.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if cfg.get("thread") else None
    spans, errors, timings = [], 0, []
    for row in cfg["rows"]:
        start = time.time()
        try:
            call = functools.partial(session.parse, row["path"], pages=cfg["pages"], name=row["name"])
            timings.append(dict((pool.submit(call).result() if pool else call()).timings))
        except Exception:
            errors += 1
        spans.append((start, time.time()))
    if pool is not None:
        pool.shutdown()
    session.close()
    per_doc = [end - start for start, end in spans]
    window = spans[-1][1] - spans[0][0] if spans else 0.0
    print(
        json.dumps(
            {
                **_steady({"loop": spans}),
                "docs": len(cfg["rows"]),
                "errors": errors,
                "load_s": round(load_s, 3),
                "window_s": round(window, 3),
                "docs_per_s": round(len(cfg["rows"]) / window, 4) if window else None,
                "median_doc_s": round(statistics.median(per_doc), 4) if per_doc else None,
                "median_timings_s": _median_timings(timings),
                "release": str(session.release_report),
                "release_ok": session.release_report.ok if session.release_report else None,
            }
        )
    )


def _serve_child(session: Any, cfg: dict[str, Any], load_s: float) -> None:
    """The loop child of the ``paired`` phase: one document per line of stdin, one JSON line back."""
    print(json.dumps({"ready": True, "load_s": round(load_s, 3)}), flush=True)
    for line in sys.stdin:
        row = json.loads(line)
        start = time.time()
        timings, error = {}, None
        try:
            timings = dict(session.parse(row["path"], pages=cfg["pages"], name=row["name"]).timings)
        except Exception as exc:
            error = type(exc).__name__
        print(json.dumps({"error": error, "seconds": time.time() - start, "timings": timings}), flush=True)
    session.close()
    print(json.dumps({"release": str(session.release_report), "release_ok": session.release_report.ok}), flush=True)


def _start_loop_child(
    args: Any, rows: list[dict[str, str]], pages: str | None, folder: Path, name: str, serve: bool = False
) -> subprocess.Popen[str]:
    config = folder / f"{name}.json"
    device = "cpu" if args.device == "cpu" else "cuda:0"
    config.write_text(
        json.dumps(
            {
                "backend": args.backend,
                "device": device,
                "models_dir": args.models_dir,
                "rows": rows,
                "pages": pages,
                "gc_freeze": args.gc_freeze == "on",
                "thread": _base(name) == "loop_thread",
                "serve": serve,
            }
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(args.cpus_per_actor))
    if device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "0"  # one card, as a Ray actor with num_gpus=1 sees it
    # the serving child's stderr goes to a file; the loop's is read back
    with (folder / f"{name}.err").open("w") if serve else contextlib.nullcontext(subprocess.PIPE) as err:
        return subprocess.Popen(
            [sys.executable, __file__, "--loop-child", str(config)],
            stdin=subprocess.PIPE if serve else None,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )


def _loop(args: Any, rows: list[dict[str, str]], pages: str | None, folder: Path, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    child = _start_loop_child(args, rows, pages, folder, name)
    profile = _Profile(args, name)
    profile.start_later(child.pid, args.profile_delay)  # once the models are loaded
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        return {"error": f"loop child exited {child.returncode}", "stderr": stderr[-3000:]}
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 3)
    result["pids"] = [child.pid]
    if (summary := profile.finish()) is not None:
        result["profile"] = summary
    return result


# --- phases 2 and 3: parse_dataset ---------------------------------------------------------------


def _ray_phase(
    args: Any,
    rows: list[dict[str, str]],
    pages: str | None,
    actors: int,
    cpus: int | None = None,
    name: str = "ray",
    niceness: int | None = None,
) -> dict[str, Any]:
    import ray

    from mineru_vram.ray import JobReport, parse_dataset

    num_gpus = 0.0 if args.device == "cpu" else 1.0
    report = JobReport()
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // args.docs_per_block))
    ds = parse_dataset(
        dataset,
        backend=args.backend,
        concurrency=actors,
        num_gpus=num_gpus,
        num_cpus=cpus or args.cpus_per_actor,
        pages=pages,
        session_options={
            "models_dir": args.models_dir,
            "preload": "all",
            "gc_freeze": args.gc_freeze == "on",
            "trust_env": False,
        },
        report=report,
        ray_remote_args=_niceness_options(niceness),  # a plain process runs at 0
    )
    t0 = time.perf_counter()
    profile = _Profile(args, name)
    out = []
    for row in ds.iter_rows():
        profile.start(row["pid"])  # the first row: the actor has loaded and parses (one actor is profiled)
        out.append(row)
    wall = time.perf_counter() - t0
    profiled = profile.finish()
    summary = report.summary(timeout=120)
    names = collections.Counter(row["name"] for row in out)
    expected = {row["name"] for row in rows}
    window = summary.seconds
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for row in out:
        spans[f"{row['node']}:{row['pid']}"].append((row["started"], row["started"] + row["seconds"]))
    return {
        **_steady(spans),
        "actors": actors,
        "num_gpus_per_actor": num_gpus,
        "docs": len(rows),
        "rows": len(out),
        "errors": sum(1 for row in out if row["error_type"] is not None),
        "error_types": dict(collections.Counter(row["error_type"] for row in out if row["error_type"])),
        "lost": sorted(expected - set(names))[:20],
        "lost_count": len(expected - set(names)),
        "duplicated": sorted(n for n, c in names.items() if c > 1)[:20],
        "window_s": round(window, 3),
        "docs_per_s": round(len(rows) / window, 4) if window else None,
        "wall_s": round(wall, 3),
        "wall_docs_per_s": round(len(rows) / wall, 4),
        "median_doc_s": round(statistics.median(row["seconds"] for row in out), 4) if out else None,
        "median_timings_s": _median_timings([json.loads(row["timings"]) for row in out if row["error_type"] is None]),
        "pids": sorted({row["pid"] for row in out}),
        "docs_per_actor": dict(collections.Counter(f"{row['node']}:{row['pid']}/gpu{row['gpu']}" for row in out)),
        "summary": str(summary),
        "summary_ok": summary.ok,
        "gpus": [dataclasses.asdict(g) for g in summary.gpus],
        "actor_load_s": [round(a.load_seconds, 3) for a in summary.actors],
        "receipts": [str(a.receipt) for a in summary.actors],
        **({"profile": profiled} if profiled is not None else {}),
    }


# --- the paired phase: the loop and a Ray actor, document by document -----------------------------


def _paired_phase(
    args: Any, rows: list[dict[str, str]], pages: str | None, folder: Path, name: str, niceness: int | None = None
) -> dict[str, Any]:
    """The loop's process and a Ray actor (:func:`mineru_vram.ray.parser_actor`) both hold their
    models on the card; each document goes to one and then the other (the order alternating), so
    both sides parse it within a second or two of each other and the machine's drift between
    phases, which decides the phase-by-phase comparisons, falls out of the ratio. Each side is
    timed from this driver (a line over a pipe; ``ray.get`` of ``parse.remote``): Ray's call
    overhead is counted, Ray Data's streaming between documents is not (``steady_gap_s_per_doc``
    of the Ray phases gives that).
    """
    import ray

    from mineru_vram.ray import parser_actor

    child = _start_loop_child(args, rows, pages, folder, name, serve=True)
    actor = parser_actor(
        args.backend,
        num_gpus=0.0 if args.device == "cpu" else 1.0,
        num_cpus=args.cpus_per_actor,
        session_options={
            "models_dir": args.models_dir,
            "preload": "all",
            "gc_freeze": args.gc_freeze == "on",
            "trust_env": False,
        },
        **_niceness_options(niceness),
    )
    try:
        assert child.stdin is not None
        assert child.stdout is not None
        ready = json.loads(child.stdout.readline() or "{}")
        if not ready.get("ready"):
            return {"error": f"the loop child did not start (see {folder / (name + '.err')})"}
        where = ray.get(actor.where.remote(), timeout=300)

        def loop_side(row: dict[str, str]) -> tuple[str | None, float, dict[str, float]]:
            child.stdin.write(json.dumps(row) + "\n")
            child.stdin.flush()
            answer = json.loads(child.stdout.readline())
            return answer["error"], answer["seconds"], answer["timings"]

        def ray_side(row: dict[str, str]) -> tuple[str | None, float, dict[str, float]]:
            answer = ray.get(actor.parse.remote(row["path"], name=row["name"], pages=pages), timeout=300)
            return answer["error_type"], answer["seconds"], json.loads(answer["timings"])

        sides = {"loop": loop_side, "ray": ray_side}
        seconds: dict[str, list[float]] = {"loop": [], "ray": []}
        inside: dict[str, list[float]] = {"loop": [], "ray": []}  # the time inside parse, as each side measured it
        timings: dict[str, list[dict[str, float]]] = {"loop": [], "ray": []}
        errors: collections.Counter[str] = collections.Counter()
        for i, row in enumerate(rows):
            for side in ("loop", "ray") if i % 2 == 0 else ("ray", "loop"):
                t0 = time.perf_counter()
                error, parse_s, parts = sides[side](row)
                seconds[side].append(time.perf_counter() - t0)
                inside[side].append(parse_s)
                timings[side].append(parts)
                errors[side] += error is not None
        child.stdin.close()
        loop_release = json.loads(child.stdout.readline() or "{}")
        ray_receipt = ray.get(actor.close.remote(), timeout=120)
    finally:
        ray.kill(actor)
        if child.poll() is None:
            child.kill()
        child.wait()
    # without each side's first document (its warm-up), as the phases' steady rates
    loop_s, ray_s = seconds["loop"][1:], seconds["ray"][1:]
    ratios = [a / b for a, b in zip(loop_s, ray_s, strict=True)]  # > 1: Ray was faster on that document
    return {
        "docs": len(rows),
        "errors": dict(errors),
        "loop_seconds": round(sum(loop_s), 3),
        "ray_seconds": round(sum(ray_s), 3),
        # the verdict: Ray's rate over the loop's on the same documents at the same moments
        "ray_vs_loop": round(sum(loop_s) / sum(ray_s), 4) if ray_s else None,
        "per_doc_ratio_median": round(statistics.median(ratios), 4) if ratios else None,
        "per_doc_ratio_ci95": _bootstrap_ci(ratios),
        "median_doc_s": {k: round(statistics.median(v[1:]), 4) for k, v in seconds.items() if v[1:]},
        # the driver's time less the time inside parse: pipe or Ray call, and the row's making
        "outside_parse_ms_per_doc": {
            k: round(1000 * (sum(seconds[k][1:]) - sum(inside[k][1:])) / len(seconds[k][1:]), 1)
            for k in seconds
            if seconds[k][1:]
        },
        "median_timings_s": {k: _median_timings(v[1:]) for k, v in timings.items()},
        "ray_extra_ms_per_doc": round(1000 * (sum(ray_s) - sum(loop_s)) / len(ray_s), 1) if ray_s else None,
        "loop_load_s": ready.get("load_s"),
        "actor": {k: where.get(k) for k in ("node", "pid", "gpu", "device")},
        "pids": [child.pid, where.get("pid")],
        "loop_release": loop_release.get("release"),
        "ray_receipt": str(ray_receipt),
    }


def _bootstrap_ci(ratios: list[float], rounds: int = 5000) -> list[float] | None:
    """The 95 % interval of the mean of per-document ratios, by resampling the documents."""
    if len(ratios) < 5:
        return None
    import random

    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(ratios, k=len(ratios))) for _ in range(rounds))
    return [round(means[int(0.025 * rounds)], 4), round(means[int(0.975 * rounds)], 4)]


def _start_ray(args: Any, cards: list[int]) -> bool:
    import ray

    ray.init(
        num_cpus=max(os.cpu_count() or 2, 2 * args.cpus_per_actor),
        num_gpus=len(cards),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=1024**3,
    )
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--models-dir", default="/tmp/mv-models", help="MinerU model tree; written with random weights if missing"
    )
    ap.add_argument("--corpus", default=None, help="PDFs to cycle (first page each); default generated one-page PDFs")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--backend", default="pipeline", choices=("pipeline", "flash"))
    ap.add_argument("--device", default=None, help="'cpu' for a smoke run; default the GPUs NVML sees")
    ap.add_argument("--cpus-per-actor", type=int, default=None, help="default: the machine's CPUs / 2")
    ap.add_argument("--docs-per-block", type=int, default=1, help="documents per Ray block (unit of work and retry)")
    ap.add_argument("--phases", default="loop,ray_1gpu,ray_2gpu")
    ap.add_argument(
        "--settle-timeout", type=float, default=60.0, help="seconds a card may take to come back after a phase"
    )
    ap.add_argument(
        "--gc-freeze",
        choices=("on", "off"),
        default="on",
        help="the sessions' gc_freeze, the same on both sides (Ray actors default to on, your process to off)",
    )
    ap.add_argument("--profile", default=None, help="a folder: py-spy each phase's parsing process into it")
    ap.add_argument("--profile-seconds", type=int, default=30)
    ap.add_argument("--profile-delay", type=float, default=30.0, help="seconds before the loop's profile starts")
    ap.add_argument("--py-spy", default="py-spy", help="the py-spy program")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.loop_child:
        _loop_child(args.loop_child)
        return

    cards = [] if args.device == "cpu" else _cards()
    if args.device != "cpu" and len(cards) < 2 and "ray_2gpu" in args.phases:
        sys.exit(f"NVML sees {len(cards)} GPU(s); the 2-GPU phase needs two (or pass --device cpu)")
    if args.device is None:
        args.device = "cuda"
    if args.cpus_per_actor is None:
        args.cpus_per_actor = max(1, (os.cpu_count() or 2) // 2)
    if args.backend == "pipeline":
        from mineru_vram.testing import write_random_models

        t0 = time.perf_counter()
        write_random_models(args.models_dir)
        models_s = time.perf_counter() - t0
    else:
        args.models_dir, models_s = None, 0.0
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": args.device,
        "cards": {str(c): _used([c])[str(c)] for c in cards},
        "backend": args.backend,
        "docs": args.docs,
        "documents": "corpus, first page" if args.corpus else "generated one-page text PDFs",
        "cpus_per_actor": args.cpus_per_actor,
        "docs_per_block": args.docs_per_block,
        "gc_freeze": args.gc_freeze,
        "models_ready_s": round(models_s, 3),
        "baseline_mib": _used(cards),
    }
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp, CardSampler(cards) as sampler, TreeCpu() as cpu:
        rows, pages = _documents(args, Path(tmp))
        ray_started = False
        for phase in phases:
            before = _used(cards)
            sampler.phase = phase
            cpu.enter(phase)
            print(f"=== {phase} ({len(rows)} documents) {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
            if _base(phase) in ("loop", "loop_thread", "loop_after"):
                result[phase] = _loop(args, rows, pages, Path(tmp), phase.replace("#", "-"))
            elif _kind(phase) == "paired":  # "paired!0": the actor at niceness 0
                ray_started = ray_started or _start_ray(args, cards)
                nice = _base(phase).partition("!")[2]
                result[phase] = _paired_phase(
                    args, rows, pages, Path(tmp), re.sub(r"[#!]", "-", phase), int(nice) if nice else None
                )
            elif _kind(phase) in ("ray_1gpu", "ray_2gpu"):
                ray_started = ray_started or _start_ray(args, cards)
                # "ray_1gpu/15": the phase with 15 CPUs per actor (Ray sets its OMP_NUM_THREADS to that);
                # "ray_1gpu@pool": each call in Ray Data's one-thread pool (its default for a callable
                # class), not on the actor's task thread that opened the session (ours; "@open" says it);
                # "ray_1gpu!0": the actors at niceness 0 (Ray's workers run at 15 unless told)
                import mineru_vram.ray

                spec, _, nice = _base(phase).partition("!")
                spec, _, where = spec.partition("@")
                name, _, cpus = spec.partition("/")
                actors = 1 if name == "ray_1gpu" else 2
                mineru_vram.ray._PARSE_ON_OPEN_THREAD = where != "pool"
                result[phase] = _ray_phase(
                    args,
                    rows,
                    pages,
                    actors=actors,
                    cpus=int(cpus) if cpus else None,
                    name=re.sub(r"[/@#!]", "-", phase),
                    niceness=int(nice) if nice else None,
                )
                result[phase]["parse_thread"] = "ray_data_pool" if where == "pool" else "open"
                result[phase]["cpus_per_actor"] = int(cpus) if cpus else args.cpus_per_actor
            else:
                sys.exit(f"unknown phase {phase}")
            sampler.phase = "idle"
            cpu.enter("idle")
            result[phase]["cpu_cores"] = cpu.cores(phase, set(result[phase].get("pids", [])))
            result[phase]["cards"] = _cards_phase(cards, before, args.settle_timeout)
            result[phase]["cards"]["peak_mib"] = sampler.peaks.get(phase, {})
            if args.out:  # a run cut off by its time limit still leaves the phases it finished
                done = [p for p in phases if p in result]
                partial = {**result, **_comparisons(result, done), "partial": done}
                Path(args.out).write_text(json.dumps(partial, indent=2))
        if ray_started:
            import ray

            ray.shutdown()
    result["after_shutdown"] = _cards_phase(cards, result["baseline_mib"], args.settle_timeout)
    result.update(_comparisons(result, phases))
    ray_phases = [p for p in phases if _base(p).startswith("ray_")]
    backs = [b for p in phases if p in result for b in result[p]["cards"]["back_at_baseline"].values()]
    backs += list(result["after_shutdown"]["back_at_baseline"].values())
    result["targets"] = {
        "two_gpus_at_least_1_9x": None if "ratio_2gpu_vs_1gpu" not in result else result["ratio_2gpu_vs_1gpu"] >= 1.9,
        "ray_within_5pct_of_loop": None if "ray_1gpu_vs_loop" not in result else result["ray_1gpu_vs_loop"] >= 0.95,
        "paired_within_5pct_of_loop": (
            None if "paired_ray_vs_loop" not in result else min(result["paired_ray_vs_loop"].values()) >= 0.95
        ),
        "cards_back_at_baseline": None if not backs or None in backs else all(backs),
        "no_document_lost": all(result[p]["lost_count"] == 0 and not result[p]["duplicated"] for p in ray_phases),
    }
    if result.get("loop_spread", 0) > 0.05:
        result["targets_note"] = (
            f"the loops differ by {result['loop_spread']:.0%} among themselves, more than the 5 % being judged: "
            "alternate more loop and Ray phases"
        )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
