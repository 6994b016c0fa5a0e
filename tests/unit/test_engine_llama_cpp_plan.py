"""The llama-cpp engine's sizing, header reading, device matching and names (no server, no wheel needed).

The GGUF files here are written byte by byte from the format's specification (magic,
version, counts, typed metadata, tensor infos, aligned data), so what :func:`read_gguf`
reads is checked against what was written, not against the writer it shares code with.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram._config import resolve_backend
from mineru_vram._engine import EngineSettings
from mineru_vram._engine.backends import llama_cpp_plan as lc
from mineru_vram._engine.backends import llama_cpp_vulkan as vk
from mineru_vram._probe import MIB

# --- a GGUF written by hand ------------------------------------------------------------------------

_U32, _F32, _STR, _ARR = 4, 6, 8, 9


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: int, value: object) -> bytes:
    out = _s(key) + struct.pack("<I", kind)
    if kind == _U32:
        return out + struct.pack("<I", value)
    if kind == _F32:
        return out + struct.pack("<f", value)
    if kind == _STR:
        return out + _s(str(value))
    assert kind == _ARR
    items = list(value)  # type: ignore[call-overload]
    if items and isinstance(items[0], str):
        return out + struct.pack("<IQ", _STR, len(items)) + b"".join(_s(i) for i in items)
    return out + struct.pack("<IQ", _U32, len(items)) + b"".join(struct.pack("<I", i) for i in items)


def _write_gguf(path: Path, *, layers: int, kv_heads: object, tensors: dict[str, int], tied: bool = False) -> Path:
    """A GGUF whose tensors have the given sizes in bytes (contents zero)."""
    meta = [
        _kv("general.architecture", _STR, "qwen2vl"),
        _kv("general.alignment", _U32, 32),
        _kv("qwen2vl.block_count", _U32, layers),
        _kv("qwen2vl.context_length", _U32, 32768),
        _kv("qwen2vl.embedding_length", _U32, 896),
        _kv("qwen2vl.attention.head_count", _U32, 14),
        _kv("tokenizer.ggml.tokens", _ARR, ["a", "b", "<|im_end|>"]),  # strings in an array are skipped
        _kv("qwen2vl.rope.dimension_sections", _ARR, [16, 24, 24, 0]),
    ]
    if isinstance(kv_heads, list):
        meta.append(_kv("qwen2vl.attention.head_count_kv", _ARR, kv_heads))
    else:
        meta.append(_kv("qwen2vl.attention.head_count_kv", _U32, kv_heads))
    if tied:
        tensors = {k: v for k, v in tensors.items() if k != "output.weight"}
    infos, offset = [], 0
    for name, size in tensors.items():
        infos.append(
            _s(name) + struct.pack("<I", 1) + struct.pack("<Q", size) + struct.pack("<I", 0) + struct.pack("<Q", offset)
        )
        offset += -(-size // 32) * 32
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + b"".join(meta) + b"".join(infos)
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + b"\0" * offset)
    return path


def _tensors(layers: int, per_layer: int = 1024, output: int = 4096, embed: int = 8192) -> dict[str, int]:
    out = {"token_embd.weight": embed, "output_norm.weight": 64, "output.weight": output}
    for i in range(layers):
        out[f"blk.{i}.attn_q.weight"] = per_layer // 2
        out[f"blk.{i}.ffn_down.weight"] = per_layer // 2
    return out


def test_the_header_gives_layers_kv_bytes_and_tensor_sizes(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", layers=3, kv_heads=2, tensors=_tensors(3))
    model = lc.read_gguf(path)
    assert model.architecture == "qwen2vl"
    assert model.layers == 3
    assert model.context_train == 32768
    # 3 layers x 2 KV heads x (64 + 64) head widths (896 / 14) x 2 bytes (f16)
    assert model.kv_bytes_per_token == 3 * 2 * 128 * 2
    assert model.layer_bytes == (1024, 1024, 1024)
    assert model.output_bytes == 4096 + 64
    assert model.file_bytes == path.stat().st_size


def test_per_layer_kv_heads_and_a_tied_output(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", layers=2, kv_heads=[1, 4], tensors=_tensors(2), tied=True)
    model = lc.read_gguf(path)
    assert model.kv_bytes_per_token == (1 + 4) * 128 * 2
    assert model.output_bytes == 8192 + 64, "a tied output is the token embedding, copied to the device"


def test_a_file_that_is_not_a_gguf_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(mv.ConfigurationError, match="cannot read its GGUF header"):
        lc.read_gguf(bad)


def test_model_files_finds_one_model_and_one_projector(tmp_path: Path) -> None:
    (tmp_path / "MinerU2.5-Pro-2605-1.2B-Q8_0.gguf").write_bytes(b"")
    (tmp_path / "mmproj-MinerU2.5-Pro-2605-1.2B-Q8_0.gguf").write_bytes(b"")
    main, mmproj = lc.model_files(tmp_path)
    assert main.name.startswith("MinerU2.5")
    assert mmproj.name.startswith("mmproj")
    (tmp_path / "other-Q4.gguf").write_bytes(b"")
    with pytest.raises(mv.ConfigurationError, match="expected one model"):
        lc.model_files(tmp_path)


# --- sizing ------------------------------------------------------------------------------------------

# MinerU2.5's decoder as the full-size random pair has it (read off its header): 24 layers of
# 15.1 MiB at Q8_0, an untied output of 137.9 MiB, 12 KiB of f16 KV per token, 32k context;
# the projector file is 673.7 MiB.
FULL = lc.GgufModel(
    architecture="qwen2vl",
    layers=24,
    context_train=32768,
    kv_bytes_per_token=12288,
    layer_bytes=tuple([round(362.85 / 24 * MIB)] * 24),
    output_bytes=round(137.95 * MIB),
    file_bytes=round(642 * MIB),
)
MMPROJ = round(673.67 * MIB)


def test_without_a_budget_the_gpu_gets_minerus_defaults() -> None:
    plan = lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=None)
    assert (plan.n_gpu_layers, plan.parallel, plan.ctx_size) == (25, 4, 4 * 32768)
    assert plan.mmproj_offload
    assert plan.note == ""
    # weights 362.8 + output 137.9 + projector 673.7 + KV 1536 (131072 x 12 KiB) + reserve
    assert plan.device_mib == pytest.approx(362.85 + 137.95 + 673.67 + 1536 + lc.RUNTIME_RESERVE_MIB, abs=1)
    assert plan.flags({}) == ["--n-gpu-layers", "25", "--ctx-size", "131072", "--parallel", "4"]


def test_a_budget_cuts_context_then_slots_then_layers() -> None:
    roomy = lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=8000)
    assert (roomy.n_gpu_layers, roomy.parallel, roomy.ctx_size) == (25, 4, 131072)
    less_context = lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=3000)
    assert (less_context.n_gpu_layers, less_context.parallel) == (25, 4)
    assert less_context.ctx_size == 4 * 16384
    assert "context 16384 per slot" in less_context.note
    fewer_slots = lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=2000)
    assert fewer_slots.n_gpu_layers == 25
    assert fewer_slots.ctx_size == fewer_slots.parallel * lc.MIN_SLOT_CONTEXT
    assert fewer_slots.parallel < 4
    fewer_layers = lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=1500)
    assert 0 < fewer_layers.n_gpu_layers < 25
    assert "layers on the device" in fewer_layers.note
    for plan in (roomy, less_context, fewer_slots, fewer_layers):
        assert plan.device_mib <= plan.budget_mib  # type: ignore[operator]


def test_a_budget_that_would_leave_no_layer_on_the_device_fails() -> None:
    with pytest.raises(mv.EngineStartError, match="does not fit a budget of 1000 MiB"):
        lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=1000)


def test_flags_in_extra_args_are_kept_and_counted() -> None:
    given = lc.given_flags(["--threads", "2", "-ngl", "all", "--ctx-size=20000", "-np", "2", "--device", "Vulkan1"])
    assert given == {"ngl": "all", "ctx": "20000", "parallel": "2", "device": "Vulkan1"}
    plan = lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=None, given=given)
    assert (plan.n_gpu_layers, plan.ctx_size, plan.parallel) == (25, 20000, 2)
    assert plan.flags(given) == [], "flags the user gave are not given twice"
    partial = lc.plan_launch(FULL, MMPROJ, gpu=True, budget_mib=None, given={"ngl": "0"})
    assert partial.flags({"ngl": "0"}) == ["--ctx-size", "131072", "--parallel", "4", "--no-mmproj-offload"]


def test_cpu_runs_minerus_defaults_with_nothing_on_a_device() -> None:
    plan = lc.plan_launch(FULL, MMPROJ, gpu=False, budget_mib=None)
    assert (plan.n_gpu_layers, plan.parallel, plan.ctx_size, plan.mmproj_offload) == (0, 4, 131072, False)
    assert plan.device_mib == 0
    assert "--no-mmproj-offload" in plan.flags({})


# --- which Vulkan device is cuda:N -------------------------------------------------------------------

_DEVICES = [
    {"index": 0, "name": "llvmpipe", "type": "cpu", "uuid": "6d657361-3232-2e33-2e36-000000000000", "pci": None},
    {
        "index": 1,
        "name": "NVIDIA H100",
        "type": "discrete",
        "uuid": "8c3f1a2b-0000-1111-2222-333344445555",
        "pci": "0000:19:00.0",
    },
    {
        "index": 2,
        "name": "NVIDIA H100",
        "type": "discrete",
        "uuid": "11111111-2222-3333-4444-555555555555",
        "pci": "0000:3b:00.0",
    },
]


def test_a_cuda_device_is_found_by_uuid_then_by_pci_address() -> None:
    assert vk.match_vulkan_device(_DEVICES, "GPU-8c3f1a2b-0000-1111-2222-333344445555", None) == 1
    # NVML writes an 8-digit domain and upper case; Vulkan a 4-digit one.
    assert vk.match_vulkan_device(_DEVICES, "GPU-ffffffff-0000-0000-0000-000000000000", "00000000:3B:00.0") == 2
    assert vk.match_vulkan_device(_DEVICES, "GPU-ffffffff-0000-0000-0000-000000000000", "00000000:5e:00.0") is None
    assert vk.match_vulkan_device(_DEVICES, None, None) is None


# --- names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-cpp", "llama-cpp-engine", "vlm-llama-cpp-engine", " LLaMA-CPP "])
def test_the_names_users_type_for_minerus_default_engine(name: str, tmp_path: Path) -> None:
    assert EngineSettings.resolve(engine=name, model_path=tmp_path, device="cpu").engine == "llama-cpp"


def test_minerus_2x_style_backend_names_imply_the_llama_cpp_engine() -> None:
    assert resolve_backend("vlm-llama-cpp-engine", engine=object()).engine == "llama-cpp"
    assert resolve_backend("hybrid-llama-cpp-engine", engine=object()).name == "hybrid"
    with pytest.raises(mv.BackendNotAvailableError, match="llama-cpp engine"):
        resolve_backend("vlm-llama-cpp-engine")


def test_the_pool_fraction_budgets_are_refused_and_budget_is_not(tmp_path: Path) -> None:
    with pytest.raises(mv.ConfigurationError, match="budget= is"):
        EngineSettings.resolve(engine="llama-cpp", model_path=tmp_path, device="cuda:0", vram_budget_gib=4)
    settings = EngineSettings.resolve(engine="llama-cpp", model_path=tmp_path, device="cuda:0", budget="4GiB")
    assert settings.budget is not None
