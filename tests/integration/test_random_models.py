"""The random-weight model tree and tiny VLM, driven through real MinerU code on CPU.

MinerU reads its configuration (and sets environment variables) when first imported,
so every test that parses runs MinerU in a fresh subprocess with its own MINERU_HOME
and MINERU_CONFIG, and reports back as JSON on its last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mineru_vram.testing import _layout
from mineru_vram.testing import _models as rm

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

REPO = "MinerU-4_models_torch"
#: What MinerU 4.0.12 reads from the tree (mineru/model/registry.py MINERU_4_MODELS_TORCH
#: and mineru/model/_internal/pytorchocr/utils/resources/models_config.yml).
EXPECTED_FILES = (
    "Layout/PP-DocLayoutV2/config.json",
    "Layout/PP-DocLayoutV2/model.safetensors",
    "Layout/PP-DocLayoutV2/preprocessor_config.json",
    "Layout/PP-DocLayoutV2/.mineru_complete",
    "OCR/paddleocr/ch_PP-OCRv6_tiny_det_infer.safetensors",
    "OCR/paddleocr/ch_PP-OCRv6_small_rec_infer.safetensors",
    "OCR/paddleocr/seal_PP-OCRv4_det_infer.pth",
    "OCR/paddleocr/.mineru_complete",
    "MFR/pp_formulanet_plus_m/PP-FormulaNet_plus-M.pth",
    "MFR/pp_formulanet_plus_m/PP-FormulaNet_plus-M_inference.yml",
    "Table/slanet-plus.onnx",
    "Table/unet.onnx",
    "Table/PP-LCNet_x1_0_table_cls.onnx",
    ".mineru_complete",
)

PARSE_SCRIPT = textwrap.dedent(
    """
    import collections, json, sys, time

    def block_types(node, counter):
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str):
                counter[kind] += 1
            for value in node.values():
                block_types(value, counter)
        elif isinstance(node, list):
            for value in node:
                block_types(value, counter)
        return counter

    def main():
        from mineru.parser import parse
        from mineru.model.runtime.hybrid import AtomModelSingleton

        docs = {}
        for pdf in sys.argv[1:]:
            started = time.perf_counter()
            result = parse(pdf, tier="basic")
            seconds = time.perf_counter() - started
            docs[pdf] = {
                "seconds": seconds,
                "pages": len(result.pages),
                "types": block_types(result.to_dict(), collections.Counter()),
                "markdown": len(result.markdown()),
            }
        keys = [[str(part) for part in key] for key in AtomModelSingleton._models]
        print(json.dumps({"docs": docs, "models": keys}))

    if __name__ == "__main__":  # MinerU renders pages in spawned worker processes
        main()
    """
)


def _mineru_env(tmp_path: Path, models_dir: Path) -> dict[str, str]:
    """Environment for a MinerU subprocess that uses ``models_dir`` offline on CPU."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = tmp_path / "mineru.yaml"
    config.write_text(
        f"model:\n  base_dir: {json.dumps(str(models_dir))}\n  source: local\n  small_backend: torch\n",
        encoding="utf-8",
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("MINERU_")}
    env.update(
        MINERU_HOME=str(home),
        MINERU_CONFIG=str(config),
        MINERU_DEVICE_MODE="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(rm.__file__).parents[2]), env.get("PYTHONPATH")])),
    )
    return env


def _run_json(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-8000:]}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse(tmp_path: Path, models_dir: Path, *pdfs: Path, timeout: float = 900) -> dict[str, object]:
    script = tmp_path / "parse_with_mineru.py"
    script.write_text(PARSE_SCRIPT, encoding="utf-8")
    return _run_json([str(script), *map(str, pdfs)], _mineru_env(tmp_path, models_dir), tmp_path, timeout)


# --------------------------------------------------------------------------- the tree


def test_tree_has_every_file_mineru_reads(random_models_dir: Path) -> None:
    repo = random_models_dir / REPO
    missing = [name for name in EXPECTED_FILES if not (repo / name).is_file()]
    assert missing == []
    manifest = json.loads((random_models_dir / ".mineru_vram_random_models.json").read_text())
    assert manifest["seed"] == 0
    assert manifest["format"] == rm._FORMAT_VERSION
    assert set(manifest["files"]) == {f"{REPO}/{name}" for name in EXPECTED_FILES}
    sizes = {name: (repo / name).stat().st_size for name in EXPECTED_FILES}
    # The layout and formula models keep their real sizes (fp32): realistic memory.
    assert 200e6 < sizes["Layout/PP-DocLayoutV2/model.safetensors"] < 230e6
    assert 600e6 < sizes["MFR/pp_formulanet_plus_m/PP-FormulaNet_plus-M.pth"] < 640e6
    assert sum(sizes.values()) < 1e9
    assert not list(random_models_dir.glob(".mineru_vram_build-*")), "staging folders must not outlive a build"


def test_second_call_returns_at_once_and_touches_nothing(random_models_dir: Path) -> None:
    weights = random_models_dir / REPO / "MFR/pp_formulanet_plus_m/PP-FormulaNet_plus-M.pth"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert rm.write_random_models(random_models_dir, seed=0) == random_models_dir
    assert time.perf_counter() - started < 1.0
    assert weights.stat().st_mtime_ns == before


def test_parse_test_pdf_exercises_layout_ocr_formula_and_tables(
    random_models_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    report = _parse(tmp_path, random_models_dir, corpus_dir / "test.pdf")
    doc = report["docs"][str(corpus_dir / "test.pdf")]  # type: ignore[index]
    assert doc["pages"] == 1
    assert doc["markdown"] > 0
    # The scripted layout puts a table and formulas on every page ...
    assert doc["types"].get("table", 0) >= 1, doc["types"]
    assert doc["types"].get("interline_equation", 0) + doc["types"].get("equation", 0) >= 1, doc["types"]
    # ... so the lazily loaded models really ran, not only the eager ones.
    loaded = {key[2] for key in report["models"]}  # type: ignore[union-attr]
    names = {name.strip("()'").split("'")[0] for name in loaded}
    assert {"layout", "ocr", "mfr", "table_cls", "wireless_table", "wired_table"} <= names, loaded
    print(f"\ntest.pdf parsed in {doc['seconds']:.1f} s on CPU; models: {sorted(loaded)}")


@pytest.mark.slow
def test_parse_generated_pdf_without_the_corpus(random_models_dir: Path, tmp_path: Path) -> None:
    """Without the corpus (a fresh clone): every model, tables included, loads and runs."""
    from mineru_vram.testing import make_pdf

    pdf = tmp_path / "generated.pdf"
    pdf.write_bytes(make_pdf(1))
    report = _parse(tmp_path, random_models_dir, pdf)
    assert report["docs"][str(pdf)]["pages"] == 1  # type: ignore[index]
    names = {key[2].strip("()'").split("'")[0] for key in report["models"]}  # type: ignore[union-attr]
    assert {"layout", "ocr", "mfr", "table_cls", "wireless_table", "wired_table"} <= names


@pytest.mark.slow
def test_parse_demo2_six_pages(random_models_dir: Path, corpus_dir: Path, tmp_path: Path) -> None:
    report = _parse(tmp_path, random_models_dir, corpus_dir / "demo2.pdf")
    doc = report["docs"][str(corpus_dir / "demo2.pdf")]  # type: ignore[index]
    assert doc["pages"] == 6
    assert doc["types"].get("table", 0) >= 6, doc["types"]
    print(f"\ndemo2.pdf parsed in {doc['seconds']:.1f} s on CPU")


# --------------------------------------------------------------------------- pieces


def test_layout_reports_the_plan_on_a_real_page(random_models_dir: Path, corpus_dir: Path) -> None:
    """MinerU's own layout wrapper, on a real page, returns exactly the scripted boxes."""
    import pypdfium2
    from mineru.model.layout.pp_doclayoutv2 import PPDocLayoutV2LayoutModel

    model = PPDocLayoutV2LayoutModel(str(random_models_dir / REPO / "Layout/PP-DocLayoutV2"), device="cpu")
    document = pypdfium2.PdfDocument(str(corpus_dir / "test.pdf"))
    try:
        page = document[0].render(scale=200 / 72).to_pil().convert("RGB")
    finally:
        document.close()
    boxes = model.predict(page)
    width, height = page.size
    got = sorted((box["label"], tuple(box["bbox"])) for box in boxes)
    wanted = sorted(
        (
            label,
            (
                round((cx - w / 2) * width),
                round((cy - h / 2) * height),
                round((cx + w / 2) * width),
                round((cy + h / 2) * height),
            ),
        )
        for label, cx, cy, w, h in _layout.LAYOUT_PLAN
    )
    assert [label for label, _ in got] == [label for label, _ in wanted]
    for (_, box), (_, want) in zip(got, wanted, strict=True):
        assert all(abs(a - b) <= 2 for a, b in zip(box, want, strict=True)), (box, want)


def test_formula_model_stops_at_the_first_token(random_models_dir: Path) -> None:
    import numpy as np
    from mineru.model.mfr.pp_formulanet.predict_formula import FormulaRecognizer

    recognizer = FormulaRecognizer(str(random_models_dir / REPO / "MFR/pp_formulanet_plus_m"), "cpu")
    assert sum(p.numel() for p in recognizer.net.parameters()) > 150_000_000  # the real size
    import torch

    with torch.inference_mode():
        tokens = recognizer.net(torch.rand(2, 3, 384, 384))
    assert tokens.tolist() == [[0, 2], [0, 2]]  # <s> then </s>, not 2560 steps
    image = (np.random.default_rng(0).random((200, 400, 3)) * 255).astype(np.uint8)
    items = recognizer.predict([{"label": "display_formula", "bbox": [10, 10, 300, 90]}], image)
    assert items[0]["latex"] == ""


def test_table_stand_ins_honour_minerus_contracts(random_models_dir: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    tables = random_models_dir / REPO / "Table"
    cls = ort.InferenceSession(str(tables / "PP-LCNet_x1_0_table_cls.onnx"))
    scores = cls.run(None, {"x": np.random.rand(3, 3, 224, 224).astype(np.float32)})[0]
    assert scores.shape == (3, 2)
    assert (scores.argmax(1) == 0).all()  # "wired", so the wired model runs too
    assert (scores.max(1) > 0.9).all()

    slanet = ort.InferenceSession(str(tables / "slanet-plus.onnx"))
    characters = slanet.get_modelmeta().custom_metadata_map["character"].splitlines()
    assert "<td>" in characters
    assert ' colspan="2"' in characters
    locations, structure = slanet.run(None, {"x": np.random.rand(2, 3, 488, 488).astype(np.float32)})
    length = structure.shape[1]
    assert locations.shape == (2, length, 8)
    assert structure.shape == (2, length, len(characters) + 2)  # + sos/eos, <td> -> <td></td>
    assert np.allclose(structure.sum(-1), 1.0, atol=1e-4)

    unet = ort.InferenceSession(str(tables / "unet.onnx"))
    for height, width in ((700, 1024), (1024, 333)):
        grid = unet.run(None, {"img": np.random.rand(1, 3, height, width).astype(np.float32)})[0]
        assert grid.shape == (1, 1, height, width)
        assert set(np.unique(grid)) == {0, 1, 2}


def test_ocr_recognizer_size_comes_from_the_dictionary(random_models_dir: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(random_models_dir / REPO / "OCR/paddleocr/ch_PP-OCRv6_small_rec_infer.safetensors"))
    assert weights["head.head.weight"].shape[0] == rm._ocr_rec_classes() == 18710


def test_pieces_are_deterministic_per_seed(tmp_path: Path) -> None:
    import torch

    with torch.no_grad():
        for seed, name in ((0, "a"), (0, "b"), (1, "c")):
            rm._build_table_models(tmp_path / name / "Table", seed)
            rm._build_ocr(tmp_path / name / "OCR", seed)

    def blobs(name: str) -> dict[str, bytes]:
        root = tmp_path / name
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert blobs("a") == blobs("b")
    other = blobs("c")
    assert other.keys() == blobs("a").keys()
    assert other != blobs("a")


def test_building_does_not_import_mineru_config(tmp_path: Path) -> None:
    """mineru.config reads the environment and may write files when imported."""
    code = textwrap.dedent(
        f"""
        import json, os, sys
        before = dict(os.environ)
        from mineru_vram.testing import _models as rm
        import torch
        with torch.no_grad():
            rm._build_ocr(__import__("pathlib").Path({str(tmp_path / "ocr")!r}), 0)
            rm._write_formula_yml(__import__("pathlib").Path({str(tmp_path / "f.yml")!r}))
        import mineru.model.layout.pp_doclayout_v2_base
        import mineru.model._internal.pytorchocr.modeling.heads.rec_ppformulanet_head
        print(json.dumps({{"config": "mineru.config" in sys.modules,
                          "env": sorted(set(os.environ) - set(before))}}))
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("MINERU_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(rm.__file__).parents[2]), env.get("PYTHONPATH")]))
    assert _run_json(["-c", code], env, tmp_path, timeout=300) == {"config": False, "env": []}


# --------------------------------------------------------------------------- tiny VLM


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rm.write_random_vlm(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl", seed=0)


def test_tiny_vlm_loads_and_generates_with_transformers(tiny_vlm: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_vlm)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Layout Detection:"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[prompt], images=[Image.new("RGB", (320, 240), "white")], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() > 0
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens == [processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")]


def test_tiny_vlm_is_idempotent(tiny_vlm: Path) -> None:
    before = (tiny_vlm / "model.safetensors").stat().st_mtime_ns
    assert rm.write_random_vlm(tiny_vlm, seed=0) == tiny_vlm
    assert (tiny_vlm / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_vlm_loads_through_minerus_transformers_engine(
    tiny_vlm: Path, random_models_dir: Path, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        f"""
        import json, time

        def main():
            from PIL import Image
            from mineru.model.vlm.runtime import ModelSingleton

            singleton = ModelSingleton()
            predictor = singleton.get_model("transformers", model_path={str(tiny_vlm)!r}, server_url=None)
            started = time.perf_counter()
            text = predictor.client.predict(Image.new("RGB", (400, 300), "white"), "Layout Detection:")
            seconds = time.perf_counter() - started
            blocks = predictor.two_step_extract(Image.new("RGB", (400, 300), "white"))
            print(json.dumps({{"client": type(predictor.client).__name__, "text": text, "blocks": len(blocks),
                              "cached": len(singleton._models), "seconds": seconds}}))
            singleton.shutdown()

        if __name__ == "__main__":
            main()
        """
    )
    script = tmp_path / "vlm_engine.py"
    script.write_text(code, encoding="utf-8")
    report = _run_json([str(script)], _mineru_env(tmp_path, random_models_dir), tmp_path, timeout=600)
    assert report["client"] == "TransformersVlmClient"
    assert report["text"] == ""
    assert report["blocks"] == 0
    assert report["cached"] == 1
    assert report["seconds"] < 30  # ends at once instead of 8192 random tokens
