"""The Vulkan device of a ``cuda:N``, for llama.cpp's ggml-vulkan: listed by a child, matched by NVML's identity.

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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mineru_vram import _process
from mineru_vram._exceptions import EngineStartError
from mineru_vram._probe import device_identity

__all__ = ["HOST_MEMORY_VARIABLES", "list_vulkan_devices", "match_vulkan_device", "vulkan_index"]

logger = logging.getLogger("mineru_vram")

# How long listing the Vulkan devices may take.
VULKAN_LIST_TIMEOUT = 60.0
# Variables the server must not inherit: ggml-vulkan spills into host memory when either is set at all.
HOST_MEMORY_VARIABLES = ("GGML_VK_ALLOW_SYSMEM_FALLBACK", "GGML_VK_PREFER_HOST_MEMORY")


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
