"""The public surface is exactly what __all__ names (httpx's tests/test_exported_members.py)."""

import mineru_vram


def test_all_matches_public_names() -> None:
    exported = set(mineru_vram.__all__)
    public = {name for name in dir(mineru_vram) if not name.startswith("_")} - {"testing", "pytest_plugin"}
    # submodules imported as a side effect are not API
    public = {n for n in public if not isinstance(getattr(mineru_vram, n), type(mineru_vram))}
    assert public - exported == set(), "public names missing from __all__"
    assert exported - (public | {"__version__"}) == set(), "__all__ names that do not exist"


def test_all_is_sorted() -> None:
    names = [n for n in mineru_vram.__all__ if n != "__version__"]
    assert names == sorted(names, key=lambda n: (n[0].islower(), n))
