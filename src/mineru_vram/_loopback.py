"""An OpenAI-compatible HTTP server on 127.0.0.1, standard library only.

It speaks the part of SGLang's HTTP API that MinerU's VLM http-client
(``mineru_vl_utils.vlm_client.http_client``) and :class:`ResidentEngine` use:

=========================================== =================================================
``GET /health``, ``/health_generate``       200 when serving (no key needed, as in SGLang)
``GET /v1/models``                          the one served model (MinerU requires exactly one)
``POST /v1/chat/completions``               one image plus a prompt in, the model's text out
                                            (``n=1`` only; ``stream=True`` answers as events)
``GET /v1/loads``                           running and waiting requests (the idle check)
``GET /model_info``, ``GET /server_info``   what the server runs with
=========================================== =================================================

Two users: the transformers engine serves MinerU's in-process transformers
model through it, so MinerU's http-client is the one parse path for every
engine; and the SGLang stand-in (``testing/_standin.py``) adds SGLang's memory endpoints
and fault injection on top of it for tests. Every endpoint except the health
probes requires ``Authorization: Bearer <api key>`` when a key is set, as
SGLang's ``decide_request_auth`` does. The key is checked from the headers alone,
before any of the body is read, and a body over ``max_body_bytes`` is refused
(413) unread: an unauthenticated client can make the server neither read nor
count anything.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "ChatRequest",
    "Completer",
    "Completion",
    "HttpError",
    "LoopbackServer",
    "Request",
    "Response",
]

logger = logging.getLogger("mineru_vram")

# SGLang lets these through without a key (k8s probes, Prometheus); so do we.
_OPEN_PREFIXES = ("/health", "/ready", "/metrics")

# The largest request body read by default: MinerU sends one page image (base64) per request.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

# OpenAI / SGLang request fields that map onto mineru_vl_utils' SamplingParams.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty")


class HttpError(Exception):
    """Raised by a route to answer with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Request:
    """One HTTP request as the routes see it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"request body is not JSON: {exc}") from None


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON, str -> text/plain, None -> "null" JSON like FastAPI
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None  # overrides the one the body's type implies


@dataclass(frozen=True)
class ChatRequest:
    """What a chat completion asks for, taken out of the OpenAI message format.

    Attributes:
        prompt: the user text (MinerU's task prompt, e.g. ``"\\nText Recognition:"``).
        image: the image bytes of the ``data:`` URL, if any.
        sampling: ``temperature``, ``top_p``, ``top_k``, ``presence_penalty``,
            ``frequency_penalty``, ``repetition_penalty``, ``no_repeat_ngram_size``,
            ``max_new_tokens``, where given.
        model: the model name the client asked for.
    """

    prompt: str
    image: bytes | None
    sampling: Mapping[str, Any]
    model: str


@dataclass(frozen=True)
class Completion:
    """The model's answer with what OpenAI clients read beside the text.

    Attributes:
        text: the generated text.
        prompt_tokens: tokens the model read (image tokens included).
        completion_tokens: tokens it generated, up to and including the end token.
        finish_reason: ``"stop"`` (the model ended) or ``"length"`` (cut at the token limit).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"


class Completer(Protocol):
    """Turns one chat request into the model's text: a plain string (no token counts) or a :class:`Completion`."""

    def complete(self, request: ChatRequest) -> str | Completion: ...


Route = Callable[[Request], Response]


def parse_chat_request(payload: Any) -> ChatRequest:
    """Pull prompt, image and sampling parameters out of an OpenAI chat payload.

    Raises:
        HttpError: (400) a payload that is not a chat completion request.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        raise HttpError(400, "a chat completion needs a JSON object with a 'messages' list")
    texts: list[str] = []
    image: bytes | None = None
    for message in payload["messages"]:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = str((part.get("image_url") or {}).get("url", ""))
                image = _decode_data_url(url)
    sampling: dict[str, Any] = {k: payload[k] for k in _SAMPLING_FIELDS if payload.get(k) is not None}
    xargs = payload.get("vllm_xargs") or {}
    if isinstance(xargs, dict) and xargs.get("no_repeat_ngram_size") is not None:
        sampling["no_repeat_ngram_size"] = xargs["no_repeat_ngram_size"]
    limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if limit is not None:
        sampling["max_new_tokens"] = limit
    return ChatRequest(prompt="".join(texts), image=image, sampling=sampling, model=str(payload.get("model", "")))


def _decode_data_url(url: str) -> bytes:
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise HttpError(400, "only base64 data: image URLs are supported on this loopback server")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HttpError(400, f"image data URL is not valid base64: {exc}") from None


def _usage(answer: Completion) -> dict[str, int]:
    total = answer.prompt_tokens + answer.completion_tokens
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens, "total_tokens": total}


def chat_response(answer: str | Completion, *, model: str) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` body with ``answer`` as the one choice.

    ``usage`` is there only where the completer counted tokens: a made-up count would mislead
    a client that budgets by it.
    """
    text = answer.text if isinstance(answer, Completion) else answer
    reason = answer.finish_reason if isinstance(answer, Completion) else "stop"
    body: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
    }
    if isinstance(answer, Completion):
        body["usage"] = _usage(answer)
    return body


def chat_stream(answer: str | Completion, *, model: str, include_usage: bool) -> str:
    """The same answer as OpenAI's server-sent events: one content chunk, the finish chunk, ``[DONE]``.

    The text is complete before the first event (the model is not streamed token by token);
    clients that ask for ``stream=True`` get the protocol they speak, with the same text.
    """
    whole = chat_response(answer, model=model)
    head = {k: whole[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = whole["choices"][0]
    events = [
        {**head, "choices": [{"index": 0, "delta": dict(choice["message"]), "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]},
    ]
    if include_usage and "usage" in whole:
        events.append({**head, "choices": [], "usage": whole["usage"]})
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"


class LoopbackServer:
    """A threaded HTTP server on loopback that serves one model through a :class:`Completer`.

    Args:
        completer: produces the text for each chat completion.
        model_id: the name ``/v1/models`` reports.
        api_key: required as a bearer token on every endpoint but the health probes.
        host: the address to bind; loopback unless a caller insists.
        port: ``0`` picks a free port.
        info: extra fields for ``/server_info`` and ``/model_info``.
        max_body_bytes: the largest request body read; larger ones get 413 unread.
    """

    def __init__(
        self,
        completer: Completer,
        *,
        model_id: str,
        api_key: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        info: Mapping[str, Any] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.completer = completer
        self.max_body_bytes = max_body_bytes
        self.model_id = model_id
        self.api_key = api_key or None
        self.info = dict(info or {})
        self.ready = True  # /health answers 503 while False
        self.running = 0  # chat completions in progress (the idle check reads it)
        self.counts: dict[str, int] = {}  # authorised requests per path, for diagnostics and the stand-in's stats
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.before: Callable[[Request], Response | None] | None = None  # fault injection hook (stand-in)
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/health"): self._health,
            ("GET", "/health_generate"): self._health,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("GET", "/v1/loads"): self._loads,
            ("GET", "/model_info"): self._model_info,
            ("GET", "/server_info"): self._server_info,
        }
        self._httpd = _Server((host, port), _handler_for(self))

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LoopbackServer:
        """Serve on a daemon thread; returns at once."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mineru-vram-loopback", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def count(self, path: str) -> int:
        with self._count_lock:
            self.counts[path] = self.counts.get(path, 0) + 1
            return self.counts[path]

    # -- routes ----------------------------------------------------------------------------------

    def _health(self, request: Request) -> Response:
        return Response(200 if self.ready else 503, "" if self.ready else "starting")

    def _models(self, request: Request) -> Response:
        return Response(
            body={
                "object": "list",
                "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "mineru-vram"}],
            }
        )

    def _chat(self, request: Request) -> Response:
        payload = request.json()
        chat = parse_chat_request(payload)
        n = payload.get("n")
        if n is not None and n != 1:
            raise HttpError(400, f"n={n!r}: this server returns one choice per request (n=1)")
        stream = bool(payload.get("stream"))
        options = payload.get("stream_options") or {}
        with self._count_lock:
            self.running += 1
        try:
            answer = self.completer.complete(chat)
        finally:
            with self._count_lock:
                self.running -= 1
        if stream:
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            events = chat_stream(answer, model=self.model_id, include_usage=include_usage)
            return Response(body=events, content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return Response(body=chat_response(answer, model=self.model_id))

    def _loads(self, request: Request) -> Response:
        load = {"dp_rank": 0, "num_running_reqs": self.running, "num_waiting_reqs": 0}
        return Response(body={"loads": [load]})

    def _model_info(self, request: Request) -> Response:
        return Response(body={"model_path": self.info.get("model_path", ""), "served_model_name": self.model_id})

    def _server_info(self, request: Request) -> Response:
        with self._count_lock:
            requests = dict(self.counts)
        return Response(body={**self.info, "port": self.port, "host": self.host, "requests": requests})

    # -- dispatch --------------------------------------------------------------------------------

    def refusal(self, path: str, headers: Mapping[str, str]) -> Response | None:
        """The 401 answer for a request without the key (``None``: it may proceed). Reads no body."""
        if not self.api_key or path.startswith(_OPEN_PREFIXES):
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(token, self.api_key):
            return None
        return Response(401, {"error": {"message": "Unauthorized", "type": "invalid_api_key"}})

    def dispatch(self, request: Request) -> Response:  # noqa: PLR0911 - one return per HTTP outcome
        refused = self.refusal(request.path, request.headers)
        if refused is not None:
            return refused
        self.count(request.path)
        if self.before is not None:
            early = self.before(request)
            if early is not None:
                return early
        route = self.routes.get((request.method, request.path))
        if route is None:
            if any(path == request.path for _, path in self.routes):
                return Response(405, {"error": {"message": f"{request.method} not allowed on {request.path}"}})
            return Response(404, {"error": {"message": f"no route {request.path}"}})
        try:
            return route(request)
        except HttpError as exc:
            return Response(exc.status, {"error": {"message": exc.message}})
        except Exception as exc:
            logger.exception("loopback server: %s %s failed", request.method, request.path)
            return Response(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # MinerU's client opens up to max_concurrency connections at once.
    request_queue_size = 256


def _handler_for(owner: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from an API server
        server_version = "mineru-vram-loopback"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            # The key first, from the headers alone: nothing of a refused request's body is read.
            early = owner.refusal(parts.path, headers)
            if early is None:
                try:
                    length = int(headers.get("content-length") or 0)
                except ValueError:
                    early = Response(400, {"error": {"message": "Content-Length is not a number"}})
                else:
                    if length < 0:
                        early = Response(400, {"error": {"message": "Content-Length is negative"}})
                    elif length > owner.max_body_bytes:
                        early = Response(
                            413,
                            {"error": {"message": f"request body of {length} bytes is over {owner.max_body_bytes}"}},
                        )
            if early is not None:
                self.close_connection = True  # the unread body must not be taken for the next request
                self._answer(early, close=True)
                return
            body = self.rfile.read(length) if length > 0 else b""
            request = Request(
                method=self.command,
                path=parts.path,
                query={k: v[-1] for k, v in parse_qs(parts.query).items()},
                headers=headers,
                body=body,
            )
            self._answer(owner.dispatch(request))

        def _answer(self, response: Response, *, close: bool = False) -> None:
            if isinstance(response.body, (dict, list)) or response.body is None:
                payload = json.dumps(response.body).encode()
                ctype = "application/json"
            else:
                payload = str(response.body).encode()
                ctype = "text/plain; charset=utf-8"
            ctype = response.content_type or ctype
            self.send_response(response.status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            if close:
                self.send_header("Connection", "close")
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _serve
        do_POST = _serve
        do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("loopback %s - %s", self.address_string(), format % args)

    return Handler
