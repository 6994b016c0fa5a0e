"""Sessions in scripts as users run them: unguarded, and started from a folder we do not trust.

MinerU's PDF renderer starts its page-render workers with multiprocessing's ``spawn``.
Two things go wrong there unless the library controls those children: ``spawn``
re-runs the parent's unguarded ``__main__`` in every worker (README's example,
saved as ``example.py``, failed with ``ConnectionResetError``), and ``python -c``
puts the current folder first on ``sys.path``, so a ``multiprocessing.py`` in the
folder the user ran from runs inside the workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mineru_vram._process import child_sys_path

SCRIPT = """\
import sys
from mineru_vram import ModelSession
from mineru_vram.testing import make_pdf

with ModelSession(backend="pipeline", device="cpu", models_dir=sys.argv[1]) as s:   # no __main__ guard
    print("pages", s.parse(make_pdf(1)).page_count)
print("released", s.release_report.ok)
"""

HIJACK = """\
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "HIJACKED-%d" % os.getpid()), "w").close()
raise SystemExit("hijacked")
"""


@pytest.mark.timeout(600)
def test_an_unguarded_script_run_from_an_untrusted_folder(tmp_path: Path, random_models_dir: Path) -> None:
    scripts, cwd = tmp_path / "scripts", tmp_path / "downloads"
    scripts.mkdir()
    cwd.mkdir()
    (scripts / "example.py").write_text(SCRIPT, encoding="utf-8")
    (cwd / "multiprocessing.py").write_text(HIJACK, encoding="utf-8")  # planted where the user stands
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(child_sys_path())}
    run = subprocess.run(
        [sys.executable, str(scripts / "example.py"), str(random_models_dir)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "pages 1" in run.stdout
    assert "released True" in run.stdout
    assert sorted(p.name for p in cwd.iterdir()) == ["multiprocessing.py"], "a child imported from the user's folder"
