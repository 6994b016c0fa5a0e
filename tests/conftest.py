"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The real-PDF corpus beside the checkout (../shared/corpus); skip where absent."""
    if not (CORPUS_DIR / "test.pdf").is_file():
        pytest.skip(f"corpus folder {CORPUS_DIR} is absent (it ships beside the project's checkout, not in it)")
    return CORPUS_DIR
