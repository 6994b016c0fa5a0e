"""``Timeline`` and the phase events, in this process; ``mineru-vram timeline`` through a subprocess."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mineru_vram import ConfigurationError, ModelSession, SessionStateError
from mineru_vram._events import ENV_EVENTS_FILE, emit, read_events, subscribe
from mineru_vram._timeline import PHASE_COLUMNS, SAMPLE_COLUMNS, Timeline, TimelineState
from mineru_vram.testing import make_pdf
from support import HAS_GPU

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- events -----------------------------------------------------------------------------------


def test_emit_without_listeners_touches_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(ENV_EVENTS_FILE, str(events))
    emit("load.start", session="x")
    assert json.loads(events.read_text(encoding="utf-8"))["event"] == "load.start", "the variable is read late"
    monkeypatch.delenv(ENV_EVENTS_FILE)
    opened: list[object] = []

    def spy(*args: object, **kwargs: object) -> None:
        opened.append(args)
        raise AssertionError("emit opened a file with no listener and no events file")

    monkeypatch.setattr("builtins.open", spy)
    emit("load.end", session="x")
    monkeypatch.undo()
    assert opened == []
    assert len(events.read_text(encoding="utf-8").splitlines()) == 1


def test_subscribe_and_unsubscribe() -> None:
    got: list[dict[str, object]] = []
    unsubscribe = subscribe(got.append)
    try:
        emit("parse.start", document="a.pdf")
    finally:
        unsubscribe()
    unsubscribe()  # idempotent
    emit("parse.end", document="a.pdf")
    assert [e["event"] for e in got] == ["parse.start"]
    assert got[0]["document"] == "a.pdf"
    assert got[0]["pid"] == os.getpid()


def test_a_failing_listener_never_breaks_the_emitter() -> None:
    def broken(event: dict[str, object]) -> None:
        raise RuntimeError("listener bug")

    got: list[dict[str, object]] = []
    undo = [subscribe(broken), subscribe(got.append)]
    try:
        emit("release.start")
    finally:
        for u in undo:
            u()
    assert [e["event"] for e in got] == ["release.start"]


def test_events_file_is_read_late_and_appended(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(ENV_EVENTS_FILE, str(path))  # set after import: emit must still see it
    emit("load.start", session="s1")
    emit("load.end", session="s1", ok=True)
    events, offset = read_events(path)
    assert [e["event"] for e in events] == ["load.start", "load.end"]
    assert events[1]["ok"] is True
    assert offset == path.stat().st_size
    # A line still being written is left for the next read.
    with open(path, "ab") as fh:
        fh.write(b'{"event": "parse.start", "time": 1.0')
    more, offset2 = read_events(path, offset)
    assert more == []
    assert offset2 == offset
    with open(path, "ab") as fh:
        fh.write(b', "pid": 1}\n')
    more, _ = read_events(path, offset)
    assert [e["event"] for e in more] == ["parse.start"]


def test_a_session_that_does_not_trust_the_environment_writes_no_events_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(ENV_EVENTS_FILE, str(path))
    heard: list[str] = []
    unsubscribe = subscribe(lambda e: heard.append(e["event"]))
    try:
        with ModelSession("flash", device="cpu", trust_env=False) as s:
            s.parse(make_pdf(1))
        assert not path.exists(), "MINERU_VRAM_EVENTS_FILE was read although trust_env=False"
        assert heard[:2] == ["load.start", "load.end"], "listeners in this process still hear the phases"
        with ModelSession("flash", device="cpu") as s:
            s.parse(make_pdf(1))
    finally:
        unsubscribe()
    events, _ = read_events(path)
    assert [e["event"] for e in events][:2] == ["load.start", "load.end"]


# --- Timeline in this process -----------------------------------------------------------------


def test_phases_pair_starts_with_ends_and_exit_runs_to_the_end() -> None:
    tl = Timeline(hz=50)
    with tl:
        tl.mark("parse.end", document="before.pdf")  # an end without its start is ignored
        tl.mark("load.start", session="s")
        tl.mark("load.end", session="s")
        with tl.phase("parse", session="s", document="/data/a.pdf"):
            time.sleep(0.05)
            tl.mark("custom.start")
            tl.mark("custom.end")
        tl.mark("parse.start", session="s", document="b.pdf")
        tl.mark("parse.end", session="s", document="b.pdf", ok=False, error="NotAPdfError: b.pdf")
        tl.mark("release.start", session="s")
        tl.mark("release.end", session="s")
        tl.mark("exit", returncode=0)
        time.sleep(0.05)
    phases = tl.phases()
    assert [p.label for p in phases] == ["load", "parse a.pdf", "custom", "parse b.pdf", "release", "exit"]
    starts = [p.start for p in phases]
    assert starts == sorted(starts)
    assert phases[-1].end is None
    assert phases[3].info["ok"] is False
    # The innermost phase wins.
    custom = phases[2]
    assert tl.phase_at(custom.start) == "custom"
    assert tl.phase_at(phases[1].start) == "parse a.pdf"
    assert tl.phase_at(tl.duration) == "exit"
    rows = list(csv.DictReader(io.StringIO(tl.to_csv(phases=True))))
    assert tuple(rows[0]) == PHASE_COLUMNS
    assert [r["label"] for r in rows] == [p.label for p in phases]
    assert rows[3]["error"] == "NotAPdfError: b.pdf"


def test_timeline_of_a_flash_session(tmp_path: Path) -> None:
    pdf = make_pdf(1)
    with Timeline(title="flash session") as tl:
        with ModelSession("flash", device="cpu") as s:
            s.parse(pdf, name="a.pdf")
            with pytest.raises(ValueError, match="not a PDF"):
                s.parse(b"garbage", name="bad.pdf")
            s.parse(pdf, name="c.pdf")
        time.sleep(0.1)
    assert tl.state is TimelineState.STOPPED
    phases = tl.phases()
    assert [p.label for p in phases] == ["load", "parse a.pdf", "parse bad.pdf", "parse c.pdf", "release"]
    assert [p.info.get("ok") for p in phases[1:4]] == [True, False, True]
    assert all(p.end is not None and p.end >= p.start for p in phases)
    assert all(b.start >= a.end for a, b in itertools.pairwise(phases) if a.end is not None)
    samples = tl.samples
    assert tl.rate_hz >= 20, f"{tl.rate_hz:.1f} Hz"
    assert statistics.median(b.time - a.time for a, b in itertools.pairwise(samples)) <= 0.05
    assert all(s.rss_mib > 0 for s in samples)
    assert os.getpid() in samples[-1].rss_by_pid
    # Samples carry the phase running at their time, in the phases' order.
    rows = list(csv.DictReader(io.StringIO(tl.to_csv(tmp_path / "t.csv"))))
    assert tuple(rows[0]) == SAMPLE_COLUMNS
    assert (tmp_path / "t.csv").read_text(encoding="utf-8").count("\n") == len(samples) + 1
    seen = [r["phase"] for r in rows if r["phase"]]
    order = [p.label for p in phases]
    assert [order.index(x) for x in seen] == sorted(order.index(x) for x in seen)
    assert "parse a.pdf" in seen
    text = repr(tl)
    assert "\n" not in text
    assert "phases: load, parse x3, release" in text


def test_plot_says_when_there_is_no_gpu(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with Timeline(device="cpu") as tl, tl.phase("work"):
        _ = [bytearray(1 << 20) for _ in range(8)]
        time.sleep(0.1)
    fig = tl.plot(tmp_path / "t.png", title="cpu test")
    assert (tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)
    assert "no GPU: host RSS shown" in fig._suptitle.get_text()
    assert "cpu test" in fig._suptitle.get_text()
    assert len(fig.axes) == 1
    png = tl._repr_png_()
    assert png is not None
    assert png.startswith(PNG_MAGIC)


def test_timeline_state_and_arguments() -> None:
    with pytest.raises(ConfigurationError, match=r"hz=0\.5"):
        Timeline(hz=0.5)
    tl = Timeline()
    assert tl.state is TimelineState.UNSTARTED
    tl.start()
    with pytest.raises(SessionStateError, match="running"):
        tl.start()
    tl.stop()
    tl.stop()  # idempotent
    with pytest.raises(SessionStateError, match="stopped"):
        tl.start()
    assert Timeline().stop().state is TimelineState.STOPPED


# --- mineru-vram timeline -- COMMAND ----------------------------------------------------------


def test_timeline_command_writes_png_csv_and_phases_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.pdf").write_bytes(make_pdf(1))
    (tmp_path / "bad.pdf").write_bytes(b"nope")
    (tmp_path / "c.pdf").write_bytes(make_pdf(2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERU_VRAM_")}
    py = sys.executable
    proc = subprocess.run(
        [py, "-m", "mineru_vram", "timeline", "-o", "tl", "--tail", "0.5", "--",
         py, "-m", "mineru_vram", "parse", "a.pdf", "bad.pdf", "c.pdf", "-o", "out",
         "--backend", "flash", "--device", "cpu", "--isolation", "process"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    # The command's exit status comes through: one document failed.
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad.pdf: NotAPdfError" in proc.stderr
    tl = tmp_path / "tl"
    png = (tl / "timeline.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    height, width = matplotlib.image.imread(str(tl / "timeline.png")).shape[:2]
    assert width >= 800
    assert height >= 400

    phases = list(csv.DictReader(io.StringIO((tl / "phases.csv").read_text(encoding="utf-8"))))
    assert [p["label"] for p in phases] == ["load", "parse a.pdf", "parse bad.pdf", "parse c.pdf", "release", "exit"]
    assert [p["ok"] for p in phases[1:4]] == ["True", "False", "True"]
    starts = [float(p["start_s"]) for p in phases]
    assert starts == sorted(starts)
    for p in phases[:-1]:
        assert float(p["end_s"]) >= float(p["start_s"])
    assert phases[-1]["end_s"] == ""  # exit runs to the end of the recording

    rows = list(csv.DictReader(io.StringIO((tl / "timeline.csv").read_text(encoding="utf-8"))))
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.median(gaps) <= 0.05, "sampled below 20 Hz"
    assert times[-1] - float(phases[-1]["start_s"]) >= 0.4  # the tail after the exit was recorded
    seen: list[str] = []
    for r in rows:
        if r["phase"] and (not seen or seen[-1] != r["phase"]):
            seen.append(r["phase"])
    labels = [p["label"] for p in phases]
    assert [labels.index(x) for x in seen] == sorted(labels.index(x) for x in seen)
    assert "parse c.pdf" in seen
    assert seen[-1] == "exit"
    # The isolated worker is a descendant of the command: it was followed too.
    pids = {int(pid.split(":")[0]) for r in rows for pid in r["rss_by_pid"].split(";") if pid}
    assert len(pids) >= 2
    during = [float(r["rss_mib"]) for r in rows if r["phase"] == "parse c.pdf"]
    after = [float(r["rss_mib"]) for r in rows if r["phase"] == "exit"][-3:]
    assert during
    assert max(during) > 50  # a python process with MinerU loaded
    assert after == [0.0] * len(after)  # the processes are gone after the exit
    if not HAS_GPU:
        assert all(r["device_used_mib"] == "" for r in rows)
    events = [json.loads(line) for line in (tl / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {e["event"] for e in events} >= {"load.start", "parse.end", "release.end"}


def test_timeline_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mineru_vram._cli import main

    assert main(["timeline", "-o", str(tmp_path / "x"), "--"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert main(["timeline", "-o", str(tmp_path / "y"), "--", str(tmp_path / "no-such-program")]) == 127
    assert "cannot run" in capsys.readouterr().err
    assert main(["timeline", "-o", str(tmp_path / "z"), "--hz", "5000", "--", "true"]) == 2


def test_sample_labels_in_one_sweep_match_phase_at() -> None:
    import random

    from mineru_vram._timeline import Phase, _labels_at

    rng = random.Random(5)
    tl = Timeline()
    for _ in range(200):
        phases = []
        for k in range(rng.randint(0, 8)):
            start = round(rng.uniform(0, 10), 1)
            end = None if rng.random() < 0.2 else round(start + rng.uniform(0, 4), 1)
            phases.append(Phase(name="p", label=f"p{k}", start=start, end=end))
        phases.sort(key=lambda p: p.start)
        times = [round(rng.uniform(-1, 15), 1) for _ in range(40)]
        assert _labels_at(times, phases) == [tl.phase_at(t, phases) for t in times]
