"""The llama-cpp engine's sizing: the model folder, the main GGUF's header, the launch that fits a budget.

**Budget.** :func:`plan_launch` reads the main GGUF's header (layers, KV heads, head
sizes, training context, each tensor's size) and fits, in this order: every layer, the
output layer and the projector on the device with MinerU's 4 slots of the training
context each; then less context per slot (halving, down to :data:`MIN_SLOT_CONTEXT`);
then fewer slots; then fewer layers on the device. What does not fit with one layer on
the device fails the start (a GPU engine never quietly runs on the CPU). The estimate:
the offloaded layers' and the output's tensors, the projector file, the f16 KV cache of
the offloaded layers (bytes per token x context) and :data:`RUNTIME_RESERVE_MIB` for
compute buffers and the Vulkan runtime. ``extra_args`` that set ``--n-gpu-layers``, ``--ctx-size``,
``--parallel`` or ``--device`` take precedence and are counted as given.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mineru_vram._engine.settings import EngineSettings
from mineru_vram._exceptions import ConfigurationError, EngineStartError
from mineru_vram._probe import MIB

__all__ = [
    "MIN_SLOT_CONTEXT",
    "MINERU_PARALLEL",
    "RUNTIME_RESERVE_MIB",
    "GgufModel",
    "LaunchPlan",
    "device_mib",
    "device_need_mib",
    "given_flags",
    "model_files",
    "plan_launch",
    "read_gguf",
    "sizing",
]

# Slots MinerU's launcher and its in-process Engine use; each gets the model's training context.
MINERU_PARALLEL = 4
# The least context per slot a budget may shrink to: a page's image tokens and its answer.
MIN_SLOT_CONTEXT = 8192
# Device memory beyond weights and KV cache: compute buffers (full size, on Mesa's lavapipe
# Vulkan device: 67.5 MiB for the text model, 225.8 MiB for the vision tower's 1288x1288
# warm-up image; on CPU 69 and 267 MiB) and the Vulkan runtime (not measured here).
RUNTIME_RESERVE_MIB = 640.0
# Bytes per cached value: llama.cpp's default KV cache type is f16.
KV_BYTES = 2
_GPU_LAYER_FLAGS = ("-ngl", "--gpu-layers", "--n-gpu-layers")
_CTX_FLAGS = ("-c", "--ctx-size")
_PARALLEL_FLAGS = ("-np", "--parallel")
_DEVICE_FLAGS = ("-dev", "--device")
_FIT_FLAGS = ("-fit", "--fit")


def model_files(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The main GGUF and the projector GGUF in a model folder (MinerU's ``llama-cpp`` layout).

    The projector is the one ``mmproj*.gguf``, the model the one other ``*.gguf``
    (``MinerU2.5-Pro-2605-1.2B-Q8_0.gguf`` and ``mmproj-...`` in MinerU's registry).

    Raises:
        ConfigurationError: not exactly one of each.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigurationError(
            f"model_path={str(folder)!r}: the llama-cpp engine takes a folder with a model GGUF and an mmproj GGUF",
            model_path=str(folder),
        )
    ggufs = sorted(p for p in root.iterdir() if p.suffix == ".gguf" and p.is_file())
    projectors = [p for p in ggufs if p.name.lower().startswith("mmproj")]
    mains = [p for p in ggufs if p not in projectors]
    if len(mains) != 1 or len(projectors) != 1:
        raise ConfigurationError(
            f"model_path={str(folder)!r}: expected one model *.gguf and one mmproj*.gguf, found "
            f"{[p.name for p in ggufs] or 'none'}",
            model_path=str(folder),
        )
    return mains[0], projectors[0]


# --- the model's header -------------------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufModel:
    """What sizing needs from a main GGUF.

    Attributes:
        architecture: ``general.architecture`` (``qwen2vl`` for MinerU2.5).
        layers: repeating blocks.
        context_train: the training context per sequence.
        kv_bytes_per_token: f16 K and V of one token in every layer.
        layer_bytes: each block's tensors, in file bytes.
        output_bytes: the output layer (``output.weight`` and ``output_norm``; the token
            embedding when the output is tied to it).
        file_bytes: the whole file.
    """

    architecture: str
    layers: int
    context_train: int
    kv_bytes_per_token: int
    layer_bytes: tuple[int, ...]
    output_bytes: int
    file_bytes: int


def _read(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _read_string(fh: BinaryIO) -> str:
    length = _read(fh, "<Q")
    return fh.read(length).decode("utf-8", "replace")


def _read_value(fh: BinaryIO, kind: int) -> Any:
    """One metadata value; long arrays and strings inside arrays are skipped (``None``)."""
    if kind in _SCALARS:
        return _read(fh, "<" + _SCALARS[kind])
    if kind == _STRING:
        return _read_string(fh)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, count = _read(fh, "<I"), _read(fh, "<Q")
    if item in _SCALARS and count <= 4096:
        return list(struct.unpack(f"<{count}{_SCALARS[item]}", fh.read(count * struct.calcsize(_SCALARS[item]))))
    if item in _SCALARS:
        fh.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
        return None
    for _ in range(count):
        _read_value(fh, item)
    return None


def _per_layer(value: Any, layers: int, default: int) -> list[int]:
    if value is None:
        return [default] * layers
    if isinstance(value, list):
        return [int(v) for v in value[:layers]] + [default] * max(0, layers - len(value))
    return [int(value)] * layers


@functools.lru_cache(maxsize=16)
def _read_gguf_cached(path: str, size: int, mtime_ns: int) -> GgufModel:
    with open(path, "rb") as raw:
        import io

        fh = io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[arg-type]
        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = _read(fh, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        tensors, kvs = _read(fh, "<Q"), _read(fh, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(kvs):
            key = _read_string(fh)
            meta[key] = _read_value(fh, _read(fh, "<I"))
        infos: list[tuple[str, int]] = []
        for _ in range(tensors):
            name = _read_string(fh)
            dims = _read(fh, "<I")
            fh.seek(8 * dims + 4, os.SEEK_CUR)  # the shape and the type: the offsets give the sizes
            infos.append((name, _read(fh, "<Q")))
        alignment = int(meta.get("general.alignment") or 32)
        data_start = -(-fh.tell() // alignment) * alignment
    arch = str(meta.get("general.architecture") or "")
    layers = int(meta.get(f"{arch}.block_count") or 0)
    if not arch or layers <= 0:
        raise ValueError("no architecture or block count in the header")
    width = int(meta.get(f"{arch}.embedding_length") or 0)
    heads = _per_layer(meta.get(f"{arch}.attention.head_count"), layers, 1)
    kv_heads = _per_layer(meta.get(f"{arch}.attention.head_count_kv"), layers, heads[0])
    head_k = int(meta.get(f"{arch}.attention.key_length") or (width // max(1, heads[0])))
    head_v = int(meta.get(f"{arch}.attention.value_length") or head_k)
    kv_per_token = sum(n * (head_k + head_v) for n in kv_heads) * KV_BYTES
    ordered = sorted(infos, key=lambda item: item[1])
    sizes: dict[str, int] = {}
    for (name, offset), following in zip(ordered, [*ordered[1:], None], strict=True):
        end = size - data_start if following is None else following[1]
        sizes[name] = max(0, end - offset)
    layer_bytes = [0] * layers
    for name, nbytes in sizes.items():
        if name.startswith("blk."):
            index = name.split(".", 2)[1]
            if index.isdigit() and int(index) < layers:
                layer_bytes[int(index)] += nbytes
    output = sizes.get("output.weight", sizes.get("token_embd.weight", 0)) + sizes.get("output_norm.weight", 0)
    return GgufModel(
        architecture=arch,
        layers=layers,
        context_train=int(meta.get(f"{arch}.context_length") or 0),
        kv_bytes_per_token=kv_per_token,
        layer_bytes=tuple(layer_bytes),
        output_bytes=output,
        file_bytes=size,
    )


def read_gguf(path: str | os.PathLike[str]) -> GgufModel:
    """Read what sizing needs from a main GGUF's header (a few MiB read, whatever the file's size).

    Raises:
        ConfigurationError: the file is not a GGUF whose header says what is needed.
    """
    try:
        info = os.stat(path)
        return _read_gguf_cached(os.fspath(path), info.st_size, info.st_mtime_ns)
    except (OSError, ValueError, struct.error) as exc:
        where = os.fspath(path)
        raise ConfigurationError(f"{where}: cannot read its GGUF header ({exc})", model_path=where) from exc


# --- sizing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    """How the server is sized: the flags, and the device memory they take by estimate.

    Attributes:
        n_gpu_layers: layers on the device (``layers + 1`` puts the output layer there too).
        ctx_size: the whole context (``--ctx-size``), shared out to the slots.
        parallel: slots (``--parallel``).
        mmproj_offload: the projector on the device.
        device_mib: the estimate of what the server holds on the device.
        budget_mib: the budget it was fitted into (``None``: none).
        note: what the budget made smaller than MinerU's defaults (``""``: nothing).
    """

    n_gpu_layers: int
    ctx_size: int
    parallel: int
    mmproj_offload: bool
    device_mib: float
    budget_mib: float | None = None
    note: str = ""

    def flags(self, given: Mapping[str, str]) -> list[str]:
        """The sizing flags, less those ``extra_args`` give (``given``: flag group -> value)."""
        out: list[str] = []
        if "ngl" not in given:
            out += ["--n-gpu-layers", str(self.n_gpu_layers)]
        if "ctx" not in given:
            out += ["--ctx-size", str(self.ctx_size)]
        if "parallel" not in given:
            out += ["--parallel", str(self.parallel)]
        if not self.mmproj_offload:
            out.append("--no-mmproj-offload")
        return out


def device_mib(model: GgufModel, mmproj_bytes: int, *, n_gpu_layers: int, ctx_size: int) -> float:
    """What the server holds on the device with ``n_gpu_layers`` there and ``ctx_size`` tokens of context.

    llama.cpp puts the last ``n_gpu_layers`` blocks on the device (the output layer when
    ``n_gpu_layers > layers``) and keeps the token embedding on the CPU; a block's KV
    cache lives where the block does; the projector goes to the device with any layer.
    """
    on_device = max(0, min(n_gpu_layers, model.layers))
    if on_device == 0:
        return 0.0
    weights = sum(model.layer_bytes[model.layers - on_device :])
    if n_gpu_layers > model.layers:
        weights += model.output_bytes
    kv = model.kv_bytes_per_token * ctx_size * on_device / model.layers
    return (weights + mmproj_bytes + kv) / MIB + RUNTIME_RESERVE_MIB


def plan_launch(
    model: GgufModel,
    mmproj_bytes: int,
    *,
    gpu: bool,
    budget_mib: float | None,
    given: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Fit the server into ``budget_mib`` (see the module docstring for the order of cuts).

    Args:
        model: the main GGUF's header.
        mmproj_bytes: the projector file's size.
        gpu: whether the server offloads to a device at all.
        budget_mib: the device memory the server may take; ``None``: MinerU's defaults.
        given: values ``extra_args`` fix, by group (``ngl``, ``ctx``, ``parallel``).

    Raises:
        EngineStartError: nothing fits the budget.
    """
    given = dict(given or {})
    full_layers = model.layers + 1
    slot_default = model.context_train or MIN_SLOT_CONTEXT
    fixed_parallel = _int_or_none(given.get("parallel"))
    fixed_ctx = _int_or_none(given.get("ctx"))
    fixed_ngl = _ngl_value(given.get("ngl"), full_layers)
    if not gpu:
        parallel = fixed_parallel or MINERU_PARALLEL
        return LaunchPlan(0, fixed_ctx or slot_default * parallel, parallel, False, 0.0)

    def fits(ngl: int, ctx: int) -> bool:
        return budget_mib is None or device_mib(model, mmproj_bytes, n_gpu_layers=ngl, ctx_size=ctx) <= budget_mib

    def plan(ngl: int, ctx: int, parallel: int, note: str = "") -> LaunchPlan:
        estimate = device_mib(model, mmproj_bytes, n_gpu_layers=ngl, ctx_size=ctx)
        return LaunchPlan(ngl, ctx, parallel, ngl > 0, estimate, budget_mib, note)

    # At least one layer: a GPU engine that a budget would put wholly on the CPU fails instead.
    ngl_options = [fixed_ngl] if fixed_ngl is not None else list(range(full_layers, 0, -1))
    parallel_options = [fixed_parallel] if fixed_parallel else [p for p in (4, 2, 1) if p <= MINERU_PARALLEL]
    slot_options: list[int] = []
    slot = slot_default
    while True:
        slot_options.append(slot)
        if slot <= MIN_SLOT_CONTEXT:
            break
        slot = max(MIN_SLOT_CONTEXT, slot // 2)
    # Context first (beyond a page it is waste), then slots (concurrency), then layers (speed).
    for ngl in ngl_options:
        for parallel in parallel_options:
            contexts = [fixed_ctx] if fixed_ctx else [s * parallel for s in slot_options]
            for ctx in contexts:
                if fits(ngl, ctx):
                    cuts = []
                    if ctx < slot_default * parallel and not fixed_ctx:
                        cuts.append(f"context {ctx // parallel} per slot (model: {slot_default})")
                    if parallel < MINERU_PARALLEL and not fixed_parallel:
                        cuts.append(f"{parallel} slot(s) (MinerU: {MINERU_PARALLEL})")
                    if ngl < full_layers and fixed_ngl is None:
                        cuts.append(f"{ngl} of {full_layers} layers on the device")
                    return plan(ngl, ctx, parallel, ", ".join(cuts))
    smallest = plan(ngl_options[-1], (fixed_ctx or MIN_SLOT_CONTEXT * parallel_options[-1]), parallel_options[-1])
    raise EngineStartError(
        f"the llama-cpp engine does not fit a budget of {budget_mib:.0f} MiB: even the smallest launch "
        f"({smallest.n_gpu_layers} layers on the device, {smallest.parallel} slot(s) of "
        f"{smallest.ctx_size // smallest.parallel} tokens) takes about {smallest.device_mib:.0f} MiB "
        f"(including {RUNTIME_RESERVE_MIB:.0f} MiB of compute buffers and runtime)",
        budget_mib=budget_mib,
        needed_mib=smallest.device_mib,
    )


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return int(value)
    return None


def _ngl_value(value: str | None, full_layers: int) -> int | None:
    if value is None:
        return None
    if value.strip().lower() == "all":
        return full_layers
    number = _int_or_none(value)
    return None if number is None else max(0, min(number, full_layers))


def given_flags(extra_args: Sequence[str]) -> dict[str, str]:
    """Sizing and device flags ``extra_args`` set, by group, with their values (last one wins)."""
    groups = {"ngl": _GPU_LAYER_FLAGS, "ctx": _CTX_FLAGS, "parallel": _PARALLEL_FLAGS, "device": _DEVICE_FLAGS}
    groups["fit"] = _FIT_FLAGS
    found: dict[str, str] = {}
    args = list(extra_args)
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        for group, names in groups.items():
            if flag in names:
                found[group] = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
    return found


def sizing(settings: EngineSettings, budget_mib: float | None) -> LaunchPlan:
    assert settings.model_path is not None  # the settings require it
    main, mmproj = model_files(settings.model_path)
    return plan_launch(
        read_gguf(main),
        mmproj.stat().st_size,
        gpu=settings.device != "cpu",
        budget_mib=budget_mib,
        given=given_flags(settings.extra_args),
    )


def device_need_mib(settings: EngineSettings, budget_mib: float | None) -> float:
    """The engine's trait: the device memory it takes within ``budget_mib`` (raises when it cannot fit)."""
    return sizing(settings, budget_mib).device_mib
