"""Write examples/notebook.ipynb from docs/guides/notebook.md, so the notebook and the guide cannot drift.

    python examples/make_notebook.py            # rewrite examples/notebook.ipynb
    python examples/make_notebook.py --check    # exit 1 when the notebook is not the guide's

The guide's prose becomes Markdown cells and each of its Python blocks a code cell, in order. A
block the guide marks ``<!-- no-test: ... -->`` (a fragment) stays in the Markdown, as do shell
blocks; the guide's test markers are dropped. Open the notebook in a folder that holds a
``paper.pdf``. tests/integration/test_notebook.py checks that the committed notebook is the one this
script writes and runs it in a real Jupyter kernel. Needs ``nbformat``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GUIDE = HERE.parent / "docs" / "guides" / "notebook.md"
NOTEBOOK = HERE / "notebook.ipynb"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<code>.*?)^```[ \t]*\n?", re.S | re.M)
MARKER = re.compile(r"^<!--\s*(test|no-test|file)\b[^>]*-->[ \t]*\n", re.M)
LINK = re.compile(r"\]\((?P<target>(?![a-z]+:|#)[^)\s]+)\)")
HEADER = (
    "*Generated from [docs/guides/notebook.md](../docs/guides/notebook.md) by `examples/make_notebook.py`: "
    "edit the guide, then run the script. The cells read a `paper.pdf` from the notebook's folder.*"
)


def _relink(prose: str) -> str:
    """The guide's relative links (``../release.md``), pointed from this folder at the same pages."""

    def move(match: re.Match[str]) -> str:
        target = (GUIDE.parent / match.group("target")).resolve()
        return f"]({os.path.relpath(target, HERE).replace(os.sep, '/')})"

    return LINK.sub(move, prose)


def cells_of(markdown: str) -> list[tuple[str, str]]:
    """The guide as ``(kind, source)`` pairs, ``kind`` being ``"markdown"`` or ``"code"``."""
    out: list[tuple[str, str]] = [("markdown", HEADER)]
    text: list[str] = []
    pos = 0
    for match in FENCE.finditer(markdown):
        before = markdown[pos : match.start()]
        marker = MARKER.search(before.rstrip("\n").rsplit("\n", 1)[-1] + "\n")
        runnable = match.group("lang") == "python" and not (marker and marker.group(1) != "test")
        if not runnable:
            text.append(before + match.group(0))
            pos = match.end()
            continue
        text.append(before)
        prose = _relink(MARKER.sub("", "".join(text))).strip("\n")
        if prose:
            out.append(("markdown", prose))
        out.append(("code", match.group("code").rstrip("\n")))
        text = []
        pos = match.end()
    prose = _relink(MARKER.sub("", "".join(text) + markdown[pos:])).strip("\n")
    if prose:
        out.append(("markdown", prose))
    return out


def build(guide: Path = GUIDE) -> Any:
    """The notebook for ``guide``, with stable cell ids (the same guide gives the same file)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    for i, (kind, source) in enumerate(cells_of(guide.read_text(encoding="utf-8"))):
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        nb.cells.append(make(source, id=f"cell-{i:02d}"))
    nbformat.validate(nb)
    return nb


def render(guide: Path = GUIDE) -> str:
    """The notebook's file content."""
    import nbformat

    return str(nbformat.writes(build(guide))) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the notebook is not the guide's")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = NOTEBOOK.read_text(encoding="utf-8") if NOTEBOOK.is_file() else ""
        if current != text:
            print(f"{NOTEBOOK} is not {GUIDE}'s: run python examples/make_notebook.py", file=sys.stderr)
            return 1
        return 0
    NOTEBOOK.write_text(text, encoding="utf-8")
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
