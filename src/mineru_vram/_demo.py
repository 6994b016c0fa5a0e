"""The offline demo: random-weight models, a PDF it writes itself, the receipt.

Runs anywhere, CPU included, with no download: the models have MinerU's true
architectures and random weights (so memory and timing are real and the text
is noise on scanned pages; text-layer PDFs still read correctly).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

__all__ = ["run_demo"]


def run_demo(
    *,
    device: str | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    isolation: str = "none",
    stream: TextIO | None = None,
) -> int:
    """Write random models, parse a generated 2-page PDF, print the release receipt.

    The models are kept in ``models_dir``, by default in the cache the test suite and
    the pytest plugin share (``$XDG_CACHE_HOME/mineru-vram/random-models``), and built
    only the first time.

    Returns:
        0 when the receipt is clean, 1 otherwise.
    """
    from ._session import ModelSession
    from .testing import make_pdf
    from .testing._cache import default_models_dir, random_models

    w = stream or sys.stdout
    target = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    t0 = time.perf_counter()
    print(f"[1/3] random-weight MinerU models in {target} ...", file=w, flush=True)
    random_models(target)
    print(f"      ready in {time.perf_counter() - t0:.1f}s", file=w, flush=True)
    pdf = make_pdf(2)
    print("[2/3] parsing a generated 2-page PDF with ModelSession(backend='pipeline') ...", file=w, flush=True)
    with ModelSession("pipeline", device=device, models_dir=target, isolation=isolation) as s:  # type: ignore[arg-type]
        result = s.parse(pdf, name="demo.pdf")
        print(f"      {result!r}", file=w)
        print("      --- markdown (first lines) ---", file=w)
        for line in result.markdown.splitlines()[:8]:
            print(f"      {line}", file=w)
        if out is not None:
            print(f"      saved to {result.save(out)}", file=w)
    print("[3/3] release receipt:", file=w)
    print(f"      {s.release_report}", file=w, flush=True)
    report = s.release_report
    return 0 if report is not None and report.ok else 1
