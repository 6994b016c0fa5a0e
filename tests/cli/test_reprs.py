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


def test_a_result_shows_a_table_and_the_start_of_its_markdown_escaped() -> None:
    from mineru_vram import ParseResult

    result = ParseResult(
        document="a<b>.pdf",
        markdown="# Title\n\n<script>alert(1)</script>" + "x" * 2000,
        content_list=[],
        middle_json={},
        page_count=3,
        backend="flash",
        device="cpu",
    )
    html = result._repr_html_()
    cells = _Cells()
    cells.feed(html)
    assert cells.tags[0] == "table"
    assert 5 <= cells.rows <= 10
    assert "pre" in cells.tags
    assert "<script>" not in html, "the document's text is escaped, never rendered"
    assert "&lt;script&gt;" in html
    assert "a&lt;b&gt;.pdf" in html
    assert len(html) < 2000, "a preview, not the whole Markdown"
    assert "\n" not in repr(result)
