"""ParseResult as plain data: its repr names its real attributes, save() writes only where it should."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def test_save_writes_the_files(tmp_path: Path) -> None:
    out = _result().save(tmp_path / "out")
    assert (out / "paper.md").read_text(encoding="utf-8") == "# Title\n"
    assert (out / "paper_content_list.json").is_file()
    assert (out / "paper_middle.json").is_file()
    assert (out / "images" / "a.png").read_bytes() == b"\x89PNG"
    _result(markdown="again\n").save(out)  # an existing output is replaced
    assert (out / "paper.md").read_text(encoding="utf-8") == "again\n"


@pytest.mark.parametrize("name", ["paper.md", "paper_middle.json", "images/a.png"])
def test_save_never_writes_through_a_link_planted_in_the_output_folder(tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / name).symlink_to(victim)
    with pytest.raises(mv.InsecurePathError, match="symbolic link"):
        _result().save(out)
    assert victim.read_text(encoding="utf-8") == "precious"


@pytest.mark.parametrize("rel", ["../outside.png", "/tmp/abs.png", "linked/a.png"])
def test_image_names_cannot_leave_the_output_folder(tmp_path: Path, rel: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="escapes the output directory"):
        _result(images={rel: b"x"}).save(out)
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "outside.png").exists()
