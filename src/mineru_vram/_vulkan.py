"""The Vulkan physical devices this machine's loader lists, as JSON: run as a child process.

``python -m mineru_vram._vulkan`` prints one JSON line: a list with one object per device
that ``vkEnumeratePhysicalDevices`` returns, in its order (the order
``GGML_VK_VISIBLE_DEVICES`` indexes), or ``{"error": ...}`` when there is no usable
Vulkan loader. Each device: ``index``, ``name``, ``type`` (``discrete``, ``integrated``,
``virtual``, ``cpu``, ``other``), ``vendor_id``, ``uuid`` (``VkPhysicalDeviceIDProperties``'s
``deviceUUID`` as 8-4-4-4-12 hex; NVIDIA's driver reports the GPU's UUID, the one CUDA
and NVML report) and ``pci`` (``domain:bus:device.function`` from ``VK_EXT_pci_bus_info``,
``None`` where the device lacks the extension).

It runs in a child, never in the library's process: creating a Vulkan instance loads the
GPU vendor's driver (its ICD) into the process that does it. It uses only the standard
library (``ctypes``) and the system's ``libvulkan.so.1``.
"""

from __future__ import annotations

import ctypes
import json
import sys
from typing import Any

__all__ = ["list_devices"]

_APPLICATION_INFO = 0
_INSTANCE_CREATE_INFO = 1
_PHYSICAL_DEVICE_PROPERTIES_2 = 1000059001
_PHYSICAL_DEVICE_ID_PROPERTIES = 1000071004
_PHYSICAL_DEVICE_PCI_BUS_INFO_PROPERTIES_EXT = 1000212000
_API_VERSION_1_1 = (1 << 22) | (1 << 12)
_PCI_BUS_INFO = b"VK_EXT_pci_bus_info"
_TYPES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
# VkPhysicalDeviceProperties: apiVersion, driverVersion, vendorID, deviceID, deviceType (uint32
# each), then deviceName[256]; the rest (limits, ...) is less than 1 KiB, the buffer below 4 KiB.
_TYPE_OFFSET = 16
_NAME_OFFSET = 20


class _ApplicationInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_uint32),
        ("pNext", ctypes.c_void_p),
        ("pApplicationName", ctypes.c_char_p),
        ("applicationVersion", ctypes.c_uint32),
        ("pEngineName", ctypes.c_char_p),
        ("engineVersion", ctypes.c_uint32),
        ("apiVersion", ctypes.c_uint32),
    ]


class _InstanceCreateInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_uint32),
        ("pNext", ctypes.c_void_p),
        ("flags", ctypes.c_uint32),
        ("pApplicationInfo", ctypes.POINTER(_ApplicationInfo)),
        ("enabledLayerCount", ctypes.c_uint32),
        ("ppEnabledLayerNames", ctypes.c_void_p),
        ("enabledExtensionCount", ctypes.c_uint32),
        ("ppEnabledExtensionNames", ctypes.c_void_p),
    ]


class _PciBusInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_uint32),
        ("pNext", ctypes.c_void_p),
        ("pciDomain", ctypes.c_uint32),
        ("pciBus", ctypes.c_uint32),
        ("pciDevice", ctypes.c_uint32),
        ("pciFunction", ctypes.c_uint32),
    ]


class _IdProperties(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_uint32),
        ("pNext", ctypes.c_void_p),
        ("deviceUUID", ctypes.c_uint8 * 16),
        ("driverUUID", ctypes.c_uint8 * 16),
        ("deviceLUID", ctypes.c_uint8 * 8),
        ("deviceNodeMask", ctypes.c_uint32),
        ("deviceLUIDValid", ctypes.c_uint32),
    ]


class _Properties2(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_uint32),
        ("pNext", ctypes.c_void_p),
        ("properties", ctypes.c_uint8 * 4096),
    ]


class _ExtensionProperties(ctypes.Structure):
    _fields_ = [("extensionName", ctypes.c_char * 256), ("specVersion", ctypes.c_uint32)]


def _uuid(raw: Any) -> str:
    text = bytes(raw).hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _has_extension(vk: Any, device: ctypes.c_void_p, name: bytes) -> bool:
    count = ctypes.c_uint32(0)
    if vk.vkEnumerateDeviceExtensionProperties(device, None, ctypes.byref(count), None) != 0:
        return False
    props = (_ExtensionProperties * count.value)()
    if vk.vkEnumerateDeviceExtensionProperties(device, None, ctypes.byref(count), props) not in (0, 5):
        return False  # 5: VK_INCOMPLETE, the list grew; what came is enough
    return any(p.extensionName == name for p in props[: count.value])


def list_devices(library: str = "libvulkan.so.1") -> list[dict[str, Any]]:
    """The physical devices, in ``vkEnumeratePhysicalDevices`` order.

    Raises:
        OSError: the loader cannot be loaded, or an instance cannot be created.
    """
    vk = ctypes.CDLL(library)
    vk.vkCreateInstance.restype = ctypes.c_int32
    vk.vkEnumeratePhysicalDevices.restype = ctypes.c_int32
    vk.vkEnumerateDeviceExtensionProperties.restype = ctypes.c_int32
    vk.vkEnumerateDeviceExtensionProperties.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_void_p,
    ]
    vk.vkGetPhysicalDeviceProperties2.restype = None
    vk.vkGetPhysicalDeviceProperties2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    vk.vkDestroyInstance.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    app = _ApplicationInfo(_APPLICATION_INFO, None, b"mineru-vram", 1, b"mineru-vram", 1, _API_VERSION_1_1)
    info = _InstanceCreateInfo(_INSTANCE_CREATE_INFO, None, 0, ctypes.pointer(app), 0, None, 0, None)
    instance = ctypes.c_void_p()
    result = vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance))
    if result != 0:
        raise OSError(f"vkCreateInstance failed with VkResult {result} (no Vulkan driver for this machine?)")
    try:
        count = ctypes.c_uint32(0)
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (ctypes.c_void_p * count.value)()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        out = []
        for index, handle in enumerate(handles[: count.value]):
            device = ctypes.c_void_p(handle)
            pci = _PciBusInfo(_PHYSICAL_DEVICE_PCI_BUS_INFO_PROPERTIES_EXT, None, 0, 0, 0, 0)
            has_pci = _has_extension(vk, device, _PCI_BUS_INFO)
            ids = _IdProperties(_PHYSICAL_DEVICE_ID_PROPERTIES, ctypes.addressof(pci) if has_pci else None)
            props = _Properties2(_PHYSICAL_DEVICE_PROPERTIES_2, ctypes.addressof(ids))
            vk.vkGetPhysicalDeviceProperties2(device, ctypes.byref(props))
            raw = bytes(props.properties)
            vendor = int.from_bytes(raw[8:12], "little")
            kind = int.from_bytes(raw[_TYPE_OFFSET : _TYPE_OFFSET + 4], "little")
            name = raw[_NAME_OFFSET : _NAME_OFFSET + 256].split(b"\0", 1)[0].decode("utf-8", "replace")
            out.append(
                {
                    "index": index,
                    "name": name,
                    "type": _TYPES.get(kind, "other"),
                    "vendor_id": vendor,
                    "uuid": _uuid(ids.deviceUUID),
                    "pci": (
                        f"{pci.pciDomain:04x}:{pci.pciBus:02x}:{pci.pciDevice:02x}.{pci.pciFunction:x}"
                        if has_pci
                        else None
                    ),
                }
            )
        return out
    finally:
        vk.vkDestroyInstance(instance, None)


def main() -> int:
    try:
        devices: Any = list_devices()
    except (OSError, AttributeError) as exc:
        devices = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(devices) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
