"""pdf.js's own test PDFs (a subset kept in tests/data/pdfjs): no false rejection, same verdicts in any order.

The subset and its ``expectations.json`` were written by ``benchmarks/verdict_conformance.py
--write-subset`` from a pdf.js snapshot: for each file, what pdf.js expects of it (``peer``) and
the verdict we gave it in a process of its own (``verdict``). Here every file is judged in one
process, in random orders, through the script's own ``judge``, so the script is exercised too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = REPO_ROOT / "tests" / "data" / "pdfjs"
SPEC = json.loads((DATA / "expectations.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def conformance() -> ModuleType:
    path = REPO_ROOT / "benchmarks" / "verdict_conformance.py"
    spec = importlib.util.spec_from_file_location("verdict_conformance", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_subset_is_the_files_its_expectations_name() -> None:
    files = {p.name for p in DATA.glob("*.pdf")}
    assert files == set(SPEC["files"])
    for name, info in SPEC["files"].items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == info["sha256"], name
    assert sum(info["bytes"] for info in SPEC["files"].values()) < 5 * 1024 * 1024
    assert (DATA / "README.md").is_file()
    assert (DATA / "LICENSE-pdf.js").is_file()
    # The two cases that were judged wrongly, and the expectations that make them count.
    assert SPEC["files"]["scan-bad.pdf"]["peer"] == "opens"
    assert {"poppler-395-0-fuzzed.pdf", "pr6531_1.pdf", "issue6069.pdf"} <= set(SPEC["files"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_any_order_every_file_gets_its_fresh_process_verdict(conformance: ModuleType, seed: int) -> None:
    names = sorted(SPEC["files"])
    random.Random(seed).shuffle(names)
    got = {name: conformance.judge(DATA / name) for name in names}
    expected = {name: (info["verdict"], info["pages"]) for name, info in SPEC["files"].items()}
    assert {name: (v["verdict"], v["pages"]) for name, v in got.items()} == expected


def test_no_file_the_peer_opens_is_rejected(conformance: ModuleType) -> None:
    opened = [n for n, info in SPEC["files"].items() if info["peer"] in conformance.OPENING]
    assert len(opened) >= 10
    rejected = {n: conformance.judge(DATA / n)["verdict"] for n in opened}
    assert {n: v for n, v in rejected.items() if v in conformance.REJECTING} == {}
    passworded = [n for n, info in SPEC["files"].items() if info["peer"] == "password"]
    assert {conformance.judge(DATA / n)["verdict"] for n in passworded} == {"encrypted"}
