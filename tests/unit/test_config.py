import os

import pytest

import mineru_vram as mv
from mineru_vram._config import env_settings, patched_environ, resolve_backend


@pytest.mark.parametrize(
    ("name", "canonical", "tier"),
    [("pipeline", "pipeline", "basic"), ("PIPELINE", "pipeline", "basic"), ("flash", "flash", "flash")],
)
def test_backend_names(name: str, canonical: str, tier: str) -> None:
    spec = resolve_backend(name)
    assert (spec.name, spec.tier) == (canonical, tier)


@pytest.mark.parametrize(
    "name", ["vlm", "hybrid", "vlm-transformers", "vlm-sglang-engine", "vlm-sglang-client", "vlm-vllm-engine"]
)
def test_vlm_backends_need_an_engine(name: str) -> None:
    with pytest.raises(mv.BackendNotAvailableError, match="engine"):
        resolve_backend(name)


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(mv.ConfigurationError, match=r"known backends: .*pipeline"):
        resolve_backend("pipelin")


def test_env_settings_parse_and_validate() -> None:
    env = {
        "MINERU_VRAM_DEVICE": "cuda:1",
        "MINERU_VRAM_STRICT": "yes",
        "MINERU_VRAM_LEAK_TOLERANCE_MIB": "12.5",
        "MINERU_VRAM_MODELS_DIR": "",
    }
    assert env_settings(env) == {"device": "cuda:1", "strict": True, "leak_tolerance_mib": 12.5}
    with pytest.raises(mv.ConfigurationError, match="MINERU_VRAM_STRICT"):
        env_settings({"MINERU_VRAM_STRICT": "maybe"})
    with pytest.raises(mv.ConfigurationError, match="number"):
        env_settings({"MINERU_VRAM_LEAK_TOLERANCE_MIB": "lots"})


def test_argument_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINERU_VRAM_DEVICE", "cpu")
    monkeypatch.setenv("MINERU_VRAM_LEAK_TOLERANCE_MIB", "7")
    s = mv.ModelSession("flash")
    assert s.device == "cpu"
    assert s.settings.leak_tolerance_mib == 7.0
    assert mv.ModelSession("flash", leak_tolerance_mib=3).settings.leak_tolerance_mib == 3.0
    assert mv.ModelSession("flash", trust_env=False).settings.leak_tolerance_mib == 32.0


def test_patched_environ_restores_set_and_side_effect_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MV_TEST_A", "old")
    monkeypatch.delenv("MV_TEST_B", raising=False)
    monkeypatch.delenv("MV_TEST_SIDE", raising=False)
    with patched_environ({"MV_TEST_A": "new", "MV_TEST_B": "b"}, also_restore=["MV_TEST_SIDE"]):
        assert os.environ["MV_TEST_A"] == "new"
        os.environ["MV_TEST_SIDE"] = "set inside"
    assert os.environ["MV_TEST_A"] == "old"
    assert "MV_TEST_B" not in os.environ
    assert "MV_TEST_SIDE" not in os.environ


def test_session_argument_validation(tmp_path: object) -> None:
    with pytest.raises(mv.ConfigurationError, match="isolation"):
        mv.ModelSession("flash", isolation="thread")  # type: ignore[arg-type]
    with pytest.raises(mv.ConfigurationError, match="device"):
        mv.ModelSession("flash", device="tpu")
    with pytest.raises(mv.ConfigurationError, match="not a directory"):
        mv.ModelSession("flash", models_dir="/nonexistent/models")
    with pytest.raises(mv.ConfigurationError, match="isolation='process'"):
        mv.ModelSession("flash", recycle_after=3)
    with pytest.raises(mv.ConfigurationError, match="preload"):
        mv.ModelSession("flash", preload="some")  # type: ignore[arg-type]


def test_patched_environ_drops_variables_for_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MV_TEST_DROP", "0")
    monkeypatch.delenv("MV_TEST_ABSENT", raising=False)
    with patched_environ({"MV_TEST_SET": "1"}, drop=["MV_TEST_DROP", "MV_TEST_ABSENT"]):
        assert "MV_TEST_DROP" not in os.environ
        assert os.environ["MV_TEST_SET"] == "1"
    assert os.environ["MV_TEST_DROP"] == "0"
    assert "MV_TEST_ABSENT" not in os.environ
    assert "MV_TEST_SET" not in os.environ


@pytest.mark.parametrize(
    ("backend", "engine", "name", "tier"),
    [
        ("vlm", "llama-cpp", "vlm", "advanced"),
        ("vlm", " LLaMA-CPP-ENGINE ", "vlm", "advanced"),
        ("hybrid", "llama-cpp", "hybrid", "standard"),
        ("vlm-llama-cpp-engine", "llama-cpp", "vlm", "advanced"),
        ("hybrid-llama-cpp-engine", "vlm-llama-cpp-engine", "hybrid", "standard"),
    ],
)
def test_engine_strings_name_minerus_in_process_llama_cpp(backend: str, engine: str, name: str, tier: str) -> None:
    spec = resolve_backend(backend, engine=engine)
    assert (spec.name, spec.tier, spec.engine, spec.local_engine) == (name, tier, "llama-cpp", "llama-cpp")
    assert resolve_backend(backend, engine=object()).local_engine is None, "a resident engine is not in process"


@pytest.mark.parametrize(
    ("backend", "engine", "match"),
    [
        ("vlm", "vllm", "ResidentEngine.get"),  # a string names an in-process engine; vLLM runs as a server
        ("vlm", "sglang", "only 'llama-cpp'"),
        ("pipeline", "llama-cpp", "runs no VLM"),
        ("flash", "llama-cpp-engine", "runs no VLM"),
        ("vlm-sglang-engine", "llama-cpp", "names the sglang engine"),
    ],
)
def test_engine_strings_that_cannot_work_are_refused(backend: str, engine: str, match: str) -> None:
    with pytest.raises(mv.ConfigurationError, match=match):
        resolve_backend(backend, engine=engine)


def test_a_vlm_backend_without_an_engine_names_both_ways() -> None:
    with pytest.raises(mv.BackendNotAvailableError, match=r"ResidentEngine.get\(\.\.\.\) or engine='llama-cpp'"):
        resolve_backend("vlm")


def test_session_with_the_in_process_engine_carries_it_to_its_runner() -> None:
    s = mv.ModelSession("vlm", engine="llama-cpp-engine", device="cpu", trust_env=False)
    assert s.settings.backend.local_engine == "llama-cpp"
    assert s.settings.vlm_config == {"engine": "llama-cpp"}, "MinerU's VlmConfig: its engine, no server"
    assert s.settings.backend.tier == "advanced"
