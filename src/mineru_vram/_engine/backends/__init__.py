"""The engine back-ends: one module per way of running a VLM server, behind :class:`~.base.Backend`.

Adding an engine is one module here and one line in :data:`BACKENDS`. The llama-cpp
engine's sizing (:mod:`.llama_cpp_plan`) and Vulkan device matching (:mod:`.llama_cpp_vulkan`)
are modules of their own beside it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .attach import AttachBackend
from .base import Backend, BackendClass, BackendContext, EngineTraits, Launcher, MemoryMove
from .llama_cpp import LlamaCppBackend
from .sglang import SGLangBackend, build_sglang_argv
from .transformers import TransformersBackend
from .vllm import VLLMBackend, build_vllm_argv

__all__ = [
    "BACKENDS",
    "ENGINE_ALIASES",
    "Backend",
    "BackendClass",
    "BackendContext",
    "EngineTraits",
    "Launcher",
    "MemoryMove",
    "build_sglang_argv",
    "build_vllm_argv",
]

# The engines by the name ``engine=`` takes, in the order error messages list them.
BACKENDS: Mapping[str, BackendClass] = {
    "sglang": SGLangBackend,
    "vllm": VLLMBackend,
    "transformers": TransformersBackend,
    "llama-cpp": LlamaCppBackend,
    "attach": AttachBackend,
}

# Other names users type for an engine: MinerU 4's backend name for llama.cpp, and the
# ``vlm-<engine>`` form of MinerU 2.x's backend names (MinerU 2.x and 3.x had no llama.cpp).
ENGINE_ALIASES: Mapping[str, str] = {
    "llama-cpp-engine": "llama-cpp",
    "vlm-llama-cpp-engine": "llama-cpp",
}
