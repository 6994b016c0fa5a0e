"""The ``mineru-vram`` command line, through real subprocesses (``python -m mineru_vram``).

Most parses use ``--backend flash`` (MinerU's real model-free tier, about a second per
small document); one uses the pipeline backend on random-weight models. Cheap argument
checks call ``main()`` in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mineru_vram._cli import main
from mineru_vram._probe import nvml_device_count
from mineru_vram.testing import make_pdf


def run_cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # The user's MINERU_VRAM_* settings must not leak into what the tests expect.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERU_VRAM_")}
    return subprocess.run(
        [sys.executable, "-m", "mineru_vram", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def check_document_folder(out: Path, stem: str, *, pages: int) -> dict[str, object]:
    """The files `parse` writes for one document; returns the middle JSON."""
    folder = out / stem
    md = folder / f"{stem}.md"
    assert md.is_file(), sorted(p.name for p in folder.iterdir()) if folder.exists() else f"{folder} missing"
    assert md.read_text(encoding="utf-8").strip(), f"{md} is empty"
    # MinerU 4's structured content and middle JSON: one entry per parsed page.
    content = json.loads((folder / f"{stem}_content_list.json").read_text(encoding="utf-8"))
    assert len(content["pages"]) == pages
    assert any(page["blocks"] for page in content["pages"]), f"{stem}_content_list.json has no block"
    middle = json.loads((folder / f"{stem}_middle.json").read_text(encoding="utf-8"))
    assert len(middle["pages"]) == pages
    # Every image the Markdown refers to was written beside it.
    for line in md.read_text(encoding="utf-8").splitlines():
        if "](images/" in line:
            rel = line.split("](", 1)[1].split(")", 1)[0]
            assert (folder / rel).is_file(), f"{rel} referenced by {md.name} was not written"
    return middle  # type: ignore[no-any-return]


def test_help_names_every_command(tmp_path: Path) -> None:
    top = run_cli("--help", cwd=tmp_path, timeout=60)
    assert top.returncode == 0, top.stderr
    for command in ("parse", "probe", "demo", "timeline", "worker"):
        assert f"    {command}" in top.stdout
    assert "exit status" in top.stdout
    parse = run_cli("parse", "--help", cwd=tmp_path, timeout=60)
    assert parse.returncode == 0
    for flag in ("--backend", "--device", "--isolation", "--pages", "-o OUT", "pipeline,flash,vlm,hybrid"):
        assert flag in parse.stdout


def test_parse_generated_pdfs_with_a_bad_one_named(tmp_path: Path) -> None:
    (tmp_path / "two.pdf").write_bytes(make_pdf(2))
    (tmp_path / "bad.pdf").write_bytes(b"this is not a PDF at all")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.pdf").write_bytes(make_pdf(1))  # same stem: must not overwrite
    proc = run_cli(
        "parse",
        "two.pdf",
        "bad.pdf",
        "missing.pdf",
        "sub/two.pdf",
        "-o",
        "out",
        "--backend",
        "flash",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # Each failure is named with its type, and the documents after it were still parsed.
    assert "bad.pdf: NotAPdfError" in proc.stderr
    assert "missing.pdf: DocumentNotFoundError" in proc.stderr
    assert "2 parsed, 2 failed" in proc.stdout
    out = tmp_path / "out"
    check_document_folder(out, "two", pages=2)
    check_document_folder(out, "two-2", pages=1)
    # flash reads the text layer: the generated table is in the Markdown, the heading in the content list.
    assert "| raw MinerU | 1280 |" in (out / "two" / "two.md").read_text(encoding="utf-8")
    assert "mineru-vram demo document" in (out / "two" / "two_content_list.json").read_text(encoding="utf-8")
    assert not (out / "bad").exists()
    assert "release receipt: release cpu (none)" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].endswith("output in out")


def test_parse_corpus_pdfs_with_pages(tmp_path: Path, corpus_dir: Path) -> None:
    files = [corpus_dir / "test.pdf", corpus_dir / "demo1.pdf", corpus_dir / "demo2.pdf"]
    proc = run_cli(
        "parse",
        *map(str, files),
        "-o",
        str(tmp_path / "out"),
        "--backend",
        "flash",
        "--device",
        "cpu",
        "--pages",
        "1-2",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 parsed, 0 failed" in proc.stdout
    out = tmp_path / "out"
    import pypdfium2

    for pdf in files:
        total = len(pypdfium2.PdfDocument(str(pdf)))
        # --pages 1-2 takes the pages a shorter document has instead of failing it.
        check_document_folder(out, pdf.stem, pages=min(2, total))
    assert any((out / "test" / "images").iterdir()), "test.pdf has figures: images/ should not be empty"


@pytest.mark.slow
def test_parse_pipeline_on_random_models_releases_them(tmp_path: Path, random_models_dir: Path) -> None:
    (tmp_path / "page.pdf").write_bytes(make_pdf(1, table=False))
    proc = run_cli(
        "parse",
        "page.pdf",
        "-o",
        "out",
        "--backend",
        "pipeline",
        "--device",
        "cpu",
        "--models-dir",
        str(random_models_dir),
        "--strict",
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_document_folder(tmp_path / "out", "page", pages=1)
    receipt = next(line for line in proc.stdout.splitlines() if line.startswith("release receipt:"))
    released = int(receipt.split(" models released")[0].rsplit(" ", 1)[1])
    assert released >= 2, receipt  # at least MinerU's OCR and layout models
    assert " 0 alive" in receipt
    assert receipt.endswith("ok")
    # MinerU's per-stage progress bars and INFO logs are off without -v.
    assert "Layout Predict" not in proc.stderr
    assert "| INFO " not in proc.stderr
    # pypdfium2 warns once per page bitmap MinerU's renderer closes; silenced where it is raised.
    assert "potentially unsafe" not in proc.stdout + proc.stderr


def test_parse_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.pdf").write_bytes(make_pdf(1))
    pdf = str(tmp_path / "a.pdf")
    out = str(tmp_path / "out")
    assert main(["parse", pdf, "-o", out, "--pages", "two"]) == 2
    assert "--pages" in capsys.readouterr().err
    assert main(["parse", pdf, "-o", out, "--backend", "vlm"]) == 2
    assert "--engine" in capsys.readouterr().err
    assert main(["parse", pdf, "-o", out, "--device", "tpu"]) == 2
    assert "unsupported device 'tpu'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["parse", str(tmp_path / "empty"), "-o", out]) == 2
    assert "no *.pdf files in folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["parse", pdf])  # -o is required
    assert exc.value.code == 2


def test_no_arguments_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: mineru-vram")
    for command in ("parse", "probe", "models", "demo", "timeline"):
        assert command in out


def test_bad_configuration_exits_2_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.pdf").write_bytes(make_pdf(1))
    pdf, out = str(tmp_path / "a.pdf"), str(tmp_path / "out")
    loads: list[object] = []

    def open_session(self: object) -> None:
        loads.append(self)

    monkeypatch.setattr("mineru_vram._session.ModelSession.open", open_session)
    assert main(["parse", pdf, "-o", out, "--timeout", "5"]) == 2
    assert "--timeout needs --isolation process" in capsys.readouterr().err
    if nvml_device_count() == 0:
        assert main(["parse", pdf, "-o", out, "--device", "cuda"]) == 2
        assert "no GPU" in capsys.readouterr().err
    assert loads == [], "refused before a session opened"


def test_models_says_what_is_on_disk_and_how_to_get_the_rest(
    tmp_path: Path, random_models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--models-dir", str(random_models_dir)]) == 0
    assert "MinerU-4_models_torch" in capsys.readouterr().out
    empty = tmp_path / "none"
    empty.mkdir()
    assert main(["models", "--models-dir", str(empty)]) == 1
    text = capsys.readouterr().out
    assert "missing" in text
    assert "GB to download" in text
    assert "mineru-vram models download --backend pipeline" in text
    assert main(["models", "--models-dir", str(empty), "--json"]) == 1
    repos = json.loads(capsys.readouterr().out)["repos"]
    assert [(r["name"], r["ready"]) for r in repos] == [("MinerU-4_models_torch", False)]


def test_probe_reports_the_machine(tmp_path: Path) -> None:
    text = run_cli("probe", cwd=tmp_path, timeout=180)
    assert text.returncode == 0, text.stderr
    data = run_cli("probe", "--json", "--no-floor", cwd=tmp_path, timeout=120)
    assert data.returncode == 0, data.stderr
    report = json.loads(data.stdout)
    assert report["mineru"]["version"].startswith("4.")
    assert report["this_process"]["torch"]["cuda_initialized"] is False  # probing never creates a context
    assert "MinerU 4." in text.stdout
    if nvml_device_count() == 0:
        assert report["gpu_count"] == 0
        assert report["gpus"] == []
        assert "GPUs: none. No GPU visible to NVML" in text.stdout
        assert "CUDA-context floor: not measured: no GPU" in text.stdout
    else:
        assert report["gpu_count"] == len(report["gpus"]) >= 1
        assert all(g["total_mib"] > 0 for g in report["gpus"])
        # Measured in a child process; a PID namespace can hide the child from NVML, and then the
        # probe must say the measurement failed rather than print a number.
        floor_line = next(line for line in text.stdout.splitlines() if line.startswith("CUDA-context floor: "))
        assert "MiB on cuda:0, measured now" in floor_line or floor_line.endswith("the measurement failed")


def test_worker_is_handed_to_the_queue(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "mineru-vram worker" in out
    assert "--until-idle" in out


def test_demo_passes_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def fake_demo(**kwargs: object) -> int:
        seen.update(kwargs)
        seen["log_level"] = os.environ.get("MINERU_LOG_LEVEL")
        return 7

    monkeypatch.setattr("mineru_vram._demo.run_demo", fake_demo)
    monkeypatch.delenv("MINERU_LOG_LEVEL", raising=False)
    code = main(["demo", "--device", "cpu", "--models-dir", str(tmp_path), "--isolation", "process"])
    assert code == 7
    assert seen == {
        "device": "cpu",
        "models_dir": str(tmp_path),
        "out": None,
        "isolation": "process",
        "log_level": "warning",  # MinerU is quiet during the demo...
    }
    assert "MINERU_LOG_LEVEL" not in os.environ  # ...and the variable is restored after it


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from mineru_vram import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mineru-vram {__version__}"


# --- the key of an attached server ----------------------------------------------------------------


@pytest.fixture
def keyed_server(tmp_path: Path) -> Any:
    """A stand-in VLM server (not SGLang) that requires its API key."""
    from mineru_vram import ResidentEngine, testing

    model = tmp_path / "model"
    model.mkdir()
    owner = ResidentEngine("sglang", model_path=model, device="cpu", launcher=testing.StandinLauncher())
    owner.start()
    yield owner
    owner.stop()
    testing.reset()


def _attached_key(argv: list[str]) -> str:
    from mineru_vram._cli.main import build_parser as _build_parser
    from mineru_vram._cli.parse import _make_engine

    engine = _make_engine(_build_parser().parse_args(argv))
    try:
        return str(engine.vlm_config()["api_key"])
    finally:
        engine.stop()


def test_the_cli_reads_the_servers_key_from_a_file_or_the_environment(
    keyed_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = keyed_server.vlm_config()["api_key"]
    base = ["parse", "a.pdf", "-o", str(tmp_path / "out"), "--backend", "vlm", "--server-url", keyed_server.url]
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    # The stand-in refuses a wrong or missing key, so attaching proves the key arrived.
    assert _attached_key([*base, "--api-key-file", str(key_file)]) == key
    monkeypatch.setenv("MINERU_VRAM_API_KEY", key)
    assert _attached_key(base) == key
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("MINERU_VRAM_API_KEY")
    assert _attached_key([*base, "--api-key", key]) == key
    assert "--api-key is deprecated" in capsys.readouterr().err  # a key on argv is said to be readable
    assert "--api-key " not in _build_help()


def _build_help() -> str:
    from mineru_vram._cli import build_parser as _build_parser

    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return str(sub.choices["parse"].format_help())  # type: ignore[attr-defined]


def test_a_bad_key_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.pdf").write_bytes(make_pdf(1))
    argv = ["parse", str(tmp_path / "a.pdf"), "-o", str(tmp_path / "out"), "--backend", "vlm"]
    argv += ["--server-url", "http://127.0.0.1:9"]
    assert main([*argv, "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "--api-key-file" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert main([*argv, "--api-key-file", str(tmp_path / "empty")]) == 2
    assert "expected the key alone on one line" in capsys.readouterr().err
