"""ParseResult as plain data: its repr names its real attributes, save() writes only where it should."""

from __future__ import annotations

import re

import mineru_vram as mv


def _result(**kw: object) -> mv.ParseResult:
    fields: dict[str, object] = {
        "document": "paper.pdf",
        "markdown": "# Title\n",
        "content_list": {"pages": []},
        "middle_json": {"pages": []},
        "images": {"images/a.png": b"\x89PNG"},
        "page_count": 3,
        **kw,
    }
    return mv.ParseResult(**fields)  # type: ignore[arg-type]


def test_repr_names_attributes_that_exist() -> None:
    result = _result()
    text = repr(result)
    assert "page_count=3" in text
    for name in re.findall(r"(\w+)=", text):
        assert hasattr(result, name), f"repr shows {name}=, which ParseResult does not have"
