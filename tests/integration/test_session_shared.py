"""ModelSession tests that only parse with an open session: they share one, so MinerU loads once.

Kept apart from test_session.py: an open session shares MinerU's process-wide models and
configuration with any other in-process session, which the tests there must not see.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram.testing import make_pdf

pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"), pytest.mark.vram_leak_check]


@pytest.fixture(scope="module")
def shared(random_models_dir: Path) -> Iterator[mv.ModelSession]:
    """One open session for the tests that only parse with it, so they pay MinerU's load once.

    ``preload="all"``: every model loads here, before any test's leak check takes its baseline,
    so the lazily loaded ones are not counted against the test that happened to parse first;
    one parse before any test, for the buffers MinerU's models create on their first call.
    Its release is checked when the module ends.
    """
    s = mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, preload="all").open()
    s.parse(make_pdf(1))
    yield s
    report = s.close()
    assert report is not None
    assert report.ok, report.problems()
    assert report.models_alive == []


def test_bad_inputs_raise_typed_errors_and_the_session_stays_usable(
    shared: mv.ModelSession, tmp_path: Path, encrypt_pdf: Callable[..., bytes]
) -> None:
    good = make_pdf(1)
    encrypted = encrypt_pdf(good)
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    cases = [
        (tmp_path / "missing.pdf", mv.DocumentNotFoundError),
        (tmp_path, mv.DocumentNotFoundError),
        (empty, mv.EmptyDocumentError),
        (b"not a pdf at all", mv.NotAPdfError),
        (good[: len(good) // 2], mv.TruncatedDocumentError),
        (encrypted, mv.EncryptedDocumentError),
    ]
    for source, error in cases:
        with pytest.raises(error) as info:
            shared.parse(source)
        assert info.value.document
        assert shared.state is mv.SessionState.OPENED
    assert shared.parse(good).page_count == 1


def test_pages_selects_a_subset(shared: mv.ModelSession) -> None:
    result = shared.parse(make_pdf(3), pages="2")
    assert result.page_count >= 1
    with pytest.raises(mv.ConfigurationError, match="outside"):
        shared.parse(make_pdf(3), pages=9)


def test_parse_many_reports_bad_documents_by_name(shared: mv.ModelSession, tmp_path: Path) -> None:
    good = tmp_path / "good.pdf"
    good.write_bytes(make_pdf(1))
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"<html>not a pdf</html>")
    batch = shared.parse_many([good, bad, good], progress=False)
    assert len(batch) == 3
    assert [item.ok for item in batch] == [True, False, True]
    assert batch.failures[0].document == str(bad)
    assert isinstance(batch.failures[0].error, mv.NotAPdfError)
    assert len(batch.results) == 2
    assert "1 failed" in repr(batch) or "bad.pdf" in repr(batch)


def test_timeout_needs_process_isolation(shared: mv.ModelSession) -> None:
    with pytest.raises(mv.ConfigurationError, match="isolation='process'"):
        shared.parse(make_pdf(1), timeout=5)


def test_no_torch_cuda_initialised_by_cpu_session(shared: mv.ModelSession) -> None:
    shared.parse(make_pdf(1))
    torch = sys.modules.get("torch")
    assert torch is not None
    assert not torch.cuda.is_initialized()
