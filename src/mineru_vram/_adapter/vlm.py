"""MinerU's VLM engines: building its in-process ones, closing them, dropping its http clients."""

from __future__ import annotations

import logging
import sys
from typing import Any

from mineru_vram._release import AliveTracker

from . import state

logger = logging.getLogger("mineru_vram")

# The handles of MinerU's VLM predictors that hold an engine's memory (mineru/model/vlm/runtime.py's names).
_VLM_HANDLES = ("llama_cpp_engine", "vllm_async_llm", "vllm_llm", "lmdeploy_engine", "model")


def vlm_config(fields: dict[str, Any] | None) -> Any:
    """MinerU's ``VlmConfig`` from plain fields (how a VLM engine is reached), or ``None``."""
    if fields is None:
        return None
    from mineru.config import VlmConfig

    return VlmConfig(**fields)


# The VLM engine is MinerU's too; what the engine needs from MinerU's internals lives here:
# building MinerU's in-process transformers VLM outside MinerU's never-evicted model cache,
# and dropping MinerU's cached http-client predictors for a server that is going away.


class TransformersVlm:
    """MinerU's in-process transformers VLM engine, owned by the caller.

    Built with ``ModelSingleton._create_model("transformers", ...)``, the very call
    ``ModelSingleton().get_model("transformers", ...)`` makes, but without putting the
    result into MinerU's cache (which is never evicted), so the resident engine owns
    the model and can move it off the device or drop it.

    Args:
        model_path: a MinerU 2.5 (Qwen2-VL) model directory.
        device: ``"cpu"`` or ``"cuda:N"``; MinerU reads it from ``MINERU_DEVICE_MODE``,
            which is set only while the model loads.
    """

    def __init__(self, model_path: str, *, device: str) -> None:
        from mineru_vram._config import patched_environ

        with patched_environ({"MINERU_DEVICE_MODE": device}, also_restore=("OMP_NUM_THREADS",)):
            from mineru.model.vlm.runtime import ModelSingleton

            predictor = ModelSingleton()._create_model("transformers", model_path, None)
        self.device = device
        self._predictor: Any = predictor
        self._client: Any = predictor.client  # mineru_vl_utils' TransformersVlmClient
        self._client.use_tqdm = False  # no progress bar per batch in a server
        self.batch_size = max(1, int(getattr(self._client, "batch_size", 1) or 1))
        _count_tokens(self._client)

    def predict(self, images: list[bytes | None], prompts: list[str], sampling: list[dict[str, Any]]) -> list[str]:
        """Run one batch: each image with its prompt and sampling parameters.

        Each answer is a :class:`CountedText`: the text, with the tokens the model read and
        wrote and whether it stopped or was cut at the token limit.
        """
        from mineru_vl_utils.vlm_client.base_client import SamplingParams

        params = [SamplingParams(**s) for s in sampling]
        return list(self._client.batch_predict(images, prompts, params))

    def to(self, device: str) -> None:
        """Move the weights (``"cpu"`` to sleep, the engine's device to wake)."""
        model = self._client.model
        if model is not None:
            model.to(device)

    def weights_device(self) -> str | None:
        """Where the model's first parameter lives (``"cpu"``, ``"cuda:0"``), or ``None`` without a model."""
        model = self.model_object()
        if model is None:
            return None
        for param in model.parameters():
            return str(param.device)
        return None

    def model_object(self) -> Any:
        return None if self._client is None else self._client.model

    def close(self) -> None:
        """Drop every reference this object and MinerU's client hold to the model."""
        from mineru.model.vlm.runtime import _clear_predictor_references

        if self._predictor is not None:
            _clear_predictor_references(self._predictor)
        self._predictor = None
        self._client = None


def drop_http_vlm_clients(server_url: str) -> int:
    """Shut down MinerU's cached http-client predictors for ``server_url``.

    MinerU caches one per server URL and headers for the life of the process; when a
    resident engine stops, its predictors (a thread and connection pools each) go too.

    Returns:
        How many were dropped.
    """
    if "mineru.model.vlm.runtime" not in sys.modules:
        return 0
    from mineru.model.vlm.runtime import ModelSingleton

    target = server_url.rstrip("/")
    with ModelSingleton._lock:
        keys = [k for k in ModelSingleton._models if k[0] == "http-client" and str(k[2] or "").rstrip("/") == target]
        victims = [ModelSingleton._models.pop(k) for k in keys]
    for predictor in victims:
        try:
            predictor.shutdown()
        except Exception as exc:  # a client that cannot close must not stop the engine's shutdown
            logger.debug("closing MinerU's http client for %s: %s", target, exc)
    return len(victims)


def load_local_vlm(
    owner: int,
    keys: list[tuple[Any, ...]],
    vlm_config: Any,
    *,
    environ: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> str:
    """Load MinerU's in-process VLM engine for ``vlm_config``, where a parse will look for it.

    Calls MinerU's own ``get_vlm_predictor`` (what its parse and its preload call), so the
    entry lands in ``ModelSingleton`` under the key the session's parses compute. An entry
    the process already had before the runtime's first load (user code ran MinerU itself)
    is used but not owned: it is never released here.

    Args:
        owner: the id of the runtime that loads it.
        keys: the runtime's list of the ``ModelSingleton`` keys it (co-)owns; the new key is added.
        vlm_config: MinerU's ``VlmConfig`` naming the engine (``engine="llama-cpp"``).
        environ: variables set while the engine loads (e.g. ``GGML_VK_VISIBLE_DEVICES``).
        drop: variables unset while it loads.

    Returns:
        MinerU's backend name of the engine (``"llama-cpp-engine"``).
    """
    from mineru.model.vlm.client import get_vlm_predictor
    from mineru.model.vlm.runtime import ModelSingleton

    from mineru_vram._config import patched_environ

    with ModelSingleton._lock:
        existing = {key: id(value) for key, value in ModelSingleton._models.items()}
    with patched_environ(environ or {}, drop=drop):
        predictor, backend = get_vlm_predictor(vlm_config)
    with state.registry_lock, ModelSingleton._lock:
        key = next((k for k, v in ModelSingleton._models.items() if v is predictor), None)
        if key is None:  # pragma: no cover - MinerU returned a predictor it did not cache
            return str(backend)
        if existing.get(key) == id(predictor) and key not in state.vlm_owners:
            logger.warning(
                "MinerU's %s engine was already loaded in this process (by code outside mineru-vram); "
                "the session uses it and leaves it loaded",
                backend,
            )
            return str(backend)
        state.vlm_owners.setdefault(key, set()).add(owner)
        if key not in keys:
            keys.append(key)
    return str(backend)


def release_local_vlm(owner: int, keys: list[tuple[Any, ...]], tracker: AliveTracker) -> int:
    """Close the in-process VLM engines a runtime loaded, unless another open runtime uses one.

    Each entry is popped from ``ModelSingleton._models`` under MinerU's lock (no parse can
    pick it up after that), then MinerU's ``_shutdown_predictor_runtime`` closes it
    (``mineru_llama_cpp.Engine.close()``) and clears MinerU's references to it. Other
    cached predictors (http-clients of resident engines) are untouched.

    Args:
        owner: the id of the runtime that releases them.
        keys: the runtime's list of ``ModelSingleton`` keys; emptied.
        tracker: tracks each closed engine by weak reference.

    Returns:
        The number of engines closed; each is tracked by weak reference.
    """
    if not keys or "mineru.model.vlm.runtime" not in sys.modules:
        return 0
    from mineru.model.vlm.runtime import ModelSingleton, _shutdown_predictor_runtime

    victims = []
    with state.registry_lock:
        for key in keys:
            owners = state.vlm_owners.get(key, set())
            owners.discard(owner)
            if owners:
                continue
            state.vlm_owners.pop(key, None)
            with ModelSingleton._lock:
                predictor = ModelSingleton._models.pop(key, None)
            if predictor is not None:
                victims.append((key, predictor))
        keys.clear()
    for key, predictor in victims:
        handles = getattr(predictor, "_mineru_runtime_handles", None) or {}
        engine = next((handles[name] for name in _VLM_HANDLES if handles.get(name) is not None), predictor)
        tracker.track(f"vlm:{key[0]}:{type(engine).__module__}.{type(engine).__name__}", engine)
        del engine
        try:
            _shutdown_predictor_runtime(predictor)
        except Exception as exc:  # the rest of the release must still run; the receipt shows what lives
            logger.warning("closing MinerU's %s engine failed: %s: %s", key[0], type(exc).__name__, exc)
    released = len(victims)
    victims.clear()
    return released


class CountedText(str):
    """A generated text that knows its token counts (the model's own, not a re-tokenisation).

    A ``str`` subclass so that it passes through MinerU's client unchanged; ``prompt_tokens``,
    ``completion_tokens`` and ``finish_reason`` (``"stop"`` or ``"length"``) are read from the
    tensors ``generate`` took and returned.
    """

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _count_tokens(client: Any) -> None:
    """Make MinerU's ``TransformersVlmClient`` return :class:`CountedText` answers.

    ``_predict_one_batch`` (mineru_vl_utils/vlm_client/transformers_client.py) runs one
    ``model.generate`` per batch and decodes it in the batch's order; both are wrapped on this
    client object only (no class is patched), and the counts of the one generate call are
    paired with the decoded texts of the same call.
    """
    model = client.model
    generate = model.generate
    one_batch = client._predict_one_batch
    counts: list[list[tuple[int, int, str]]] = []

    def counted_generate(*args: Any, **kwargs: Any) -> Any:
        output = generate(*args, **kwargs)
        counts.append(_generation_counts(model, kwargs, output))
        return output

    def counted_batch(*args: Any, **kwargs: Any) -> list[str]:
        counts.clear()
        texts = one_batch(*args, **kwargs)
        rows = counts[-1] if counts else []
        if len(rows) != len(texts):
            return list(texts)
        answers: list[str] = []
        for text, (prompt, completion, reason) in zip(texts, rows, strict=True):
            answer = CountedText(text)
            answer.prompt_tokens, answer.completion_tokens, answer.finish_reason = prompt, completion, reason
            answers.append(answer)
        return answers

    model.generate = counted_generate
    client._predict_one_batch = counted_batch


def _generation_counts(model: Any, inputs: dict[str, Any], output: Any) -> list[tuple[int, int, str]]:
    """Per row of one ``generate`` call: (prompt tokens, generated tokens up to the end token, finish reason)."""
    input_ids = inputs.get("input_ids")
    if input_ids is None or not hasattr(output, "shape"):
        return []
    mask = inputs.get("attention_mask")
    width = int(input_ids.shape[1])
    eos = getattr(model.generation_config, "eos_token_id", None)
    ends = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    rows = []
    for i, row in enumerate(output[:, width:].tolist()):
        prompt = int(mask[i].sum()) if mask is not None else width
        stop = next((j for j, token in enumerate(row) if token in ends), None)
        rows.append((prompt, len(row) if stop is None else stop + 1, "length" if stop is None else "stop"))
    return rows
