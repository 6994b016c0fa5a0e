"""MinerU's transformers VLM engine as a loopback OpenAI server: the ``transformers`` engine's process.

Started by :class:`ResidentEngine` (never imported by ``import mineru_vram``)::

    python -m mineru_vram._vlm_serve --model-path P --host 127.0.0.1 --port N --config key.yaml \\
        --device cuda --base-gpu-id 0 [--served-model-name S] [--max-new-tokens M]

The flags mirror ``sglang.launch_server``'s, and so do the endpoints (``_loopback.py``
plus ``/release_memory_occupation`` and ``/resume_memory_occupation``), so the
engine supervises both servers the same way and MinerU's http-client is the one
parse path. The model is MinerU's own transformers engine
(``ModelSingleton._create_model("transformers", ...)``, through the adapter).

Why a child process and not this one: the VLM's weights and CUDA context then
belong to a process of their own, so a session's release receipt in the parent
measures only the session's models, a crash cannot take the application down,
and ``stop()`` returns every byte by ending the process.

Sleep moves the weights to host memory and empties the allocator cache (the
CUDA context stays); wake moves them back. Both answer with ``moved_mib``, the
change in torch's reserved memory, so the engine knows how far NVML should see
the process move (a tiny model's weights move less than NVML resolves).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._adapter.vlm import CountedText
from ._loopback import ChatRequest, Completion, HttpError, LoopbackServer, Request, Response
from ._probe import MIB

__all__ = ["main"]


class _Batcher:
    """Feeds concurrent chat requests to the model in batches, one batch at a time."""

    def __init__(self, vlm: Any, *, max_batch: int, window: float = 0.005) -> None:
        self.vlm = vlm
        self.max_batch = max(1, max_batch)
        self.window = window
        self.queue: queue.Queue[Any] = queue.Queue()
        self.model_lock = threading.Lock()  # held while the model runs; sleep takes it to move weights
        self._thread = threading.Thread(target=self._run, name="mineru-vram-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: bytes | None, prompt: str, sampling: dict[str, Any]) -> str:
        import concurrent.futures

        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        self.queue.put((image, prompt, sampling, future))
        return future.result()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            try:
                with self.model_lock:
                    texts = self.vlm.predict([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
            except BaseException as exc:
                for b in batch:
                    b[3].set_exception(exc)
            else:
                for b, text in zip(batch, texts, strict=True):
                    b[3].set_result(text)


class _Server:
    def __init__(self, args: argparse.Namespace) -> None:
        from ._adapter import TransformersVlm

        self.args = args
        self.device = "cpu" if args.device == "cpu" else f"cuda:{args.base_gpu_id}"
        self.vlm = TransformersVlm(args.model_path, device=self.device)
        self.batcher = _Batcher(self.vlm, max_batch=self.vlm.batch_size)
        self.on_device = True
        model_id = args.served_model_name or Path(args.model_path).name or "mineru-vlm"
        self.http = LoopbackServer(
            self,
            model_id=model_id,
            api_key=args.api_key,
            host=args.host,
            port=args.port,
            info={
                "model_path": args.model_path,
                "served_model_name": model_id,
                "device": self.device,
                "engine": "transformers (MinerU's, via mineru_vram._vlm_serve)",
                "enable_memory_saver": True,
                "max_new_tokens": args.max_new_tokens,
            },
        )
        for method in ("GET", "POST"):
            self.http.routes[(method, "/release_memory_occupation")] = self._release
            self.http.routes[(method, "/resume_memory_occupation")] = self._resume

    def complete(self, request: ChatRequest) -> str | Completion:
        sampling = dict(request.sampling)
        cap = self.args.max_new_tokens
        if cap is not None:
            sampling["max_new_tokens"] = min(int(sampling.get("max_new_tokens") or cap), cap)
        text = self.batcher.submit(request.image, request.prompt, sampling)
        if isinstance(text, CountedText):
            return Completion(str(text), text.prompt_tokens, text.completion_tokens, text.finish_reason)
        return text

    def _release(self, request: Request) -> Response:
        if self.http.running:
            raise HttpError(400, "release_memory_occupation should be called only when server is idle.")
        if self.device == "cpu":
            return Response(body={"note": "the transformers engine runs on CPU: nothing to release on a device"})
        from ._release import return_allocator_memory

        before = self._reserved_mib()
        with self.batcher.model_lock:
            self.vlm.to("cpu")
            self.on_device = False
        return_allocator_memory(self.device)
        moved = round(before - self._reserved_mib(), 3)
        return Response(body={"note": "", "moved_mib": moved, "weights_device": self.vlm.weights_device()})

    def _resume(self, request: Request) -> Response:
        before = self._reserved_mib()
        if self.device != "cpu" and not self.on_device:
            with self.batcher.model_lock:
                self.vlm.to(self.device)
                self.on_device = True
        moved = round(self._reserved_mib() - before, 3)
        return Response(body={"note": "", "moved_mib": moved, "weights_device": self.vlm.weights_device()})

    def _reserved_mib(self) -> float:
        """What torch's allocator holds on the device: what NVML should see move on sleep and wake."""
        if self.device == "cpu":
            return 0.0
        import torch

        return float(torch.cuda.memory_reserved(self.device)) / MIB


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mineru_vram._vlm_serve")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", default=None, help="a JSON (YAML) file with api-key, as SGLang's --config")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--base-gpu-id", type=int, default=0)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(list(argv))
    if args.config:
        config = json.loads(Path(args.config).read_text(encoding="utf-8") or "{}")
        args.api_key = args.api_key or config.get("api-key") or config.get("api_key")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    print(f"mineru-vram transformers VLM server: {args.model_path} on {args.device}, pid {os.getpid()}", flush=True)
    server = _Server(args)

    def _stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    print(f"serving on {server.http.url}", flush=True)
    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        server.http.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
