"""Receipts and snapshots read well: a compact table in Jupyter, one readable line elsewhere."""

from __future__ import annotations

import html.parser

import pytest

from mineru_vram import ModelSession, ReleaseReport, VramSnapshot, vram_snapshot
from mineru_vram.testing import make_pdf


class _Cells(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.rows = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.rows += tag == "tr"


@pytest.fixture(scope="module")
def report() -> ReleaseReport:
    with ModelSession("flash", device="cpu") as s:
        s.parse(make_pdf(1), name="one.pdf")
    assert s.release_report is not None
    return s.release_report


def test_notebook_and_terminal_forms(report: ReleaseReport) -> None:
    snapshot = vram_snapshot("cpu")
    objects: list[ReleaseReport | VramSnapshot] = [report, snapshot]
    for obj in objects:
        cells = _Cells()
        cells.feed(obj._repr_html_())
        assert cells.tags[0] == "table"
        assert 5 <= cells.rows <= 20, "a compact table"
        line = str(obj)
        assert "\n" not in line
        assert len(line) < 300
    assert str(report).endswith("ok")
    assert "no GPU" in str(snapshot)


def test_repr_in_a_terminal_is_the_readable_line(report: ReleaseReport) -> None:
    snapshot = vram_snapshot("cpu")
    assert repr(report) == str(report)
    assert repr(snapshot) == str(snapshot)
