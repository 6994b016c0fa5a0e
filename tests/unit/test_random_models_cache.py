"""write_random_models' caching rules, with the expensive build replaced by a stub."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mineru_vram.testing import _layout, _tables
from mineru_vram.testing import _models as rm


class StubBuild:
    """Stands in for ``_build_model_tree``: a small tree, counted, optionally failing."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.fail = False

    def __call__(self, repo: Path, seed: int) -> None:
        self.calls.append(seed)
        (repo / "Layout").mkdir(parents=True)
        (repo / "Layout" / "weights.bin").write_bytes(bytes([seed % 256]) * 64)
        if self.fail:
            raise RuntimeError("boom mid-build")
        (repo / rm._COMPLETE_MARKER).touch()


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> StubBuild:
    build = StubBuild()
    monkeypatch.setattr(rm, "_build_model_tree", build)
    return build


def _manifest(root: Path) -> dict[str, object]:
    return json.loads((root / rm._MANIFEST_NAME).read_text())


def test_builds_once_per_seed_and_rebuilds_on_request(tmp_path: Path, stub: StubBuild) -> None:
    root = tmp_path / "models"
    assert rm.write_random_models(root, seed=3) == root
    assert rm.write_random_models(str(root), seed=3) == root  # str paths too
    assert stub.calls == [3]
    assert _manifest(root)["seed"] == 3
    assert (root / rm._REPO_NAME / "Layout" / "weights.bin").read_bytes() == bytes([3]) * 64

    rm.write_random_models(root, seed=4)  # another seed replaces the tree
    assert stub.calls == [3, 4]
    assert (root / rm._REPO_NAME / "Layout" / "weights.bin").read_bytes() == bytes([4]) * 64

    rm.write_random_models(root, seed=4, overwrite=True)
    assert stub.calls == [3, 4, 4]
    assert not list(root.glob(rm._STAGING_PREFIX + "*"))


def test_crash_mid_build_leaves_nothing_that_looks_complete(tmp_path: Path, stub: StubBuild) -> None:
    root = tmp_path / "models"
    rm.write_random_models(root, seed=1)
    stub.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        rm.write_random_models(root, seed=2)
    assert not (root / rm._MANIFEST_NAME).exists()
    assert not list(root.glob(rm._STAGING_PREFIX + "*"))
    stub.fail = False
    rm.write_random_models(root, seed=1)  # the old tree is not trusted without its manifest
    assert stub.calls == [1, 2, 1]


def test_a_damaged_tree_is_rebuilt(tmp_path: Path, stub: StubBuild) -> None:
    root = tmp_path / "models"
    rm.write_random_models(root, seed=0)
    (root / rm._REPO_NAME / "Layout" / "weights.bin").write_bytes(b"truncated")
    rm.write_random_models(root, seed=0)
    assert stub.calls == [0, 0]
    (root / rm._MANIFEST_NAME).write_text("{not json")
    rm.write_random_models(root, seed=0)
    assert stub.calls == [0, 0, 0]


def test_a_stale_manifest_format_is_rebuilt(tmp_path: Path, stub: StubBuild) -> None:
    root = tmp_path / "models"
    rm.write_random_models(root, seed=0)
    data = _manifest(root)
    data["format"] = -1
    (root / rm._MANIFEST_NAME).write_text(json.dumps(data))
    rm.write_random_models(root, seed=0)
    assert stub.calls == [0, 0]


def test_concurrent_callers_build_once(tmp_path: Path, stub: StubBuild) -> None:
    root = tmp_path / "models"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            rm.write_random_models(root, seed=5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stub.calls == [5]


def test_negative_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed"):
        rm.write_random_models(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        rm.write_random_vlm(tmp_path / "vlm", seed=-1)


def test_region_thresholds_split_evenly_at_gaps() -> None:
    values = [0.1] * 3 + [0.2] * 3 + [0.3] * 3 + [0.4] * 3 + [0.5] * 3
    cuts = _layout.region_thresholds(values, regions=3)
    assert [round(threshold, 3) for threshold, _ in cuts] == [0.15, 0.25, 0.35, 0.45]
    assert all(abs(gap - 0.1) < 1e-9 for _, gap in cuts)
    with pytest.raises(RuntimeError, match="distinct positions"):
        _layout.region_thresholds([0.1, 0.2, 0.3], regions=3)


def test_onnx_writer_varints() -> None:
    assert _tables._varint(0) == b"\x00"
    assert _tables._varint(300) == b"\xac\x02"
    assert _tables._varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1 as protobuf writes it
