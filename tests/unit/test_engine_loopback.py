"""The loopback OpenAI server (shared by the transformers engine and the SGLang stand-in), in-thread."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mineru_vram._engine import http
from mineru_vram._loopback import ChatRequest, Completion, HttpError, LoopbackServer, parse_chat_request
from mineru_vram.testing._standin import STANDIN_LAYOUT, STANDIN_TEXT, StandinLauncher, _parse_args, canned_completion


class EchoCompleter:
    """Stand-in completer: answers with what it was asked, so the parsing can be checked."""

    def __init__(self) -> None:
        self.seen: list[ChatRequest] = []

    def complete(self, request: ChatRequest) -> str:
        self.seen.append(request)
        if request.prompt == "boom":
            raise RuntimeError("model failed")
        return f"echo:{request.prompt}"


@pytest.fixture
def server() -> Iterator[tuple[LoopbackServer, EchoCompleter]]:
    completer = EchoCompleter()
    srv = LoopbackServer(completer, model_id="tiny-vlm", api_key="sekret").start()
    yield srv, completer
    srv.shutdown()


def _chat(prompt: str, image: bytes | None = b"\x89PNG fake") -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": prompt})
    return {
        "model": "tiny-vlm",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "temperature": 0.0,
        "top_k": 1,
        "repetition_penalty": 1.0,
        "vllm_xargs": {"no_repeat_ngram_size": 100, "debug": False},
        "max_completion_tokens": 64,
        "max_tokens": 64,
        "skip_special_tokens": False,
    }


def test_health_needs_no_key_everything_else_does(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, _ = server
    assert http.request("GET", f"{srv.url}/health")[0] == 200
    assert http.request("GET", f"{srv.url}/health_generate")[0] == 200
    for path in ("/v1/models", "/v1/loads", "/server_info", "/model_info"):
        assert http.request("GET", f"{srv.url}{path}")[0] == 401, path
        assert http.request("GET", f"{srv.url}{path}", api_key="wrong")[0] == 401, path
        assert http.request("GET", f"{srv.url}{path}", api_key="sekret")[0] == 200, path
    status, body = http.request("POST", f"{srv.url}/v1/chat/completions", body=_chat("x"))
    assert status == 401
    assert body["error"]["type"] == "invalid_api_key"


def test_models_lists_exactly_one(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, _ = server
    status, body = http.request("GET", f"{srv.url}/v1/models", api_key="sekret")
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["tiny-vlm"]


def test_chat_completion_round_trip(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, completer = server
    status, body = http.request(
        "POST", f"{srv.url}/v1/chat/completions", api_key="sekret", body=_chat("\nLayout Detection:")
    )
    assert status == 200
    choice = body["choices"][0]
    assert choice["message"]["content"] == "echo:\nLayout Detection:"
    assert choice["finish_reason"] == "stop"
    assert body["object"] == "chat.completion"
    seen = completer.seen[-1]
    assert seen.image == b"\x89PNG fake"
    assert seen.sampling == {
        "temperature": 0.0,
        "top_k": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 100,
        "max_new_tokens": 64,
    }
    assert srv.counts["/v1/chat/completions"] == 1
    assert srv.running == 0


def test_errors_are_openai_shaped(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, _ = server
    status, body = http.request("POST", f"{srv.url}/v1/chat/completions", api_key="sekret", body=_chat("boom"))
    assert status == 500
    assert "model failed" in body["error"]["message"]
    assert srv.running == 0, "a failed completion must not stay counted as running"
    assert http.request("GET", f"{srv.url}/nope", api_key="sekret")[0] == 404
    assert http.request("GET", f"{srv.url}/v1/chat/completions", api_key="sekret")[0] == 405
    status, body = http.request("POST", f"{srv.url}/v1/chat/completions", api_key="sekret", body={"messages": "x"})
    assert status == 400


def test_parse_chat_request_rejects_remote_image_urls() -> None:
    payload = _chat("x", image=None)
    payload["messages"][1]["content"].insert(0, {"type": "image_url", "image_url": {"url": "http://evil/x.png"}})
    with pytest.raises(HttpError, match="data: image URLs"):
        parse_chat_request(payload)


def test_plain_string_content_is_a_prompt_without_image() -> None:
    chat = parse_chat_request({"messages": [{"role": "user", "content": "hello"}], "model": "m"})
    assert (chat.prompt, chat.image, chat.model) == ("hello", None, "m")


def test_canned_answers_follow_mineru_formats() -> None:
    from mineru_vl_utils.mineru_client import MinerUClientHelper

    assert canned_completion("\nLayout Detection:") == STANDIN_LAYOUT
    assert canned_completion("\nText Recognition:") == STANDIN_TEXT
    assert "<fcel>" in canned_completion("\nTable Recognition:")
    # MinerU's own parser reads the stand-in's layout as a title and a text block.
    helper = MinerUClientHelper.__new__(MinerUClientHelper)
    helper.debug = False
    blocks = MinerUClientHelper.parse_layout_output(helper, STANDIN_LAYOUT)
    assert [b.type for b in blocks] == ["title", "text"]
    assert blocks[0].bbox == pytest.approx([0.1, 0.06, 0.9, 0.12])
    assert blocks[0].angle == 0


def test_standin_reads_flags_and_the_key_from_config(tmp_path: Path) -> None:
    config = tmp_path / "k.yaml"
    config.write_text(json.dumps({"api-key": "from-file"}), encoding="utf-8")
    args = _parse_args(
        ["--model", "/m", "--port", "9", "--config", str(config), "--enable-memory-saver", "--tp-size", "2"]
    )
    assert (args.model_path, args.port, args.api_key, args.enable_memory_saver) == ("/m", 9, "from-file", True)
    assert args.unknown == ["--tp-size", "2"]


def test_standin_launcher_validates_faults() -> None:
    with pytest.raises(ValueError, match="unknown stand-in faults"):
        StandinLauncher({"explode": 1})
    with pytest.raises(ValueError, match=r"not an sglang\.launch_server"):
        StandinLauncher()(["python", "-m", "other"], env={}, log_path=Path("/dev/null"))


def _raw_request(srv: LoopbackServer, head: str, timeout: float = 5.0) -> str:
    """Send request headers (and no body) on a raw socket; the status line the server answers with."""
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        return sock.makefile("rb").readline().decode().strip()


def test_the_key_is_checked_before_any_body_is_read(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, _ = server
    # 400 MiB announced, nothing sent: a server that reads before checking the key would wait for it.
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 419430400\r\n\r\n"
    assert _raw_request(srv, head) == "HTTP/1.1 401 Unauthorized"
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        "Authorization: Bearer wrong\r\nContent-Length: 419430400\r\n\r\n"
    )
    assert _raw_request(srv, head) == "HTTP/1.1 401 Unauthorized"


def test_a_body_over_the_cap_is_refused_unread(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, completer = server
    too_big = srv.max_body_bytes + 1
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer sekret\r\nContent-Length: {too_big}\r\n\r\n"
    )
    assert _raw_request(srv, head) == "HTTP/1.1 413 Request Entity Too Large"
    assert completer.seen == []
    assert http.request("POST", f"{srv.url}/v1/chat/completions", api_key="sekret", body=_chat("ok"))[0] == 200


def test_only_authorised_requests_are_counted(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, _ = server
    for _ in range(3):
        assert http.request("GET", f"{srv.url}/v1/models")[0] == 401
        assert http.request("POST", f"{srv.url}/v1/chat/completions", body=_chat("x"))[0] == 401
    assert "/v1/models" not in srv.counts
    assert "/v1/chat/completions" not in srv.counts
    assert http.request("GET", f"{srv.url}/v1/models", api_key="sekret")[0] == 200
    assert http.request("GET", f"{srv.url}/health")[0] == 200  # open probes count: they need no key
    assert srv.counts == {"/v1/models": 1, "/health": 1}


def test_a_memory_call_that_gets_no_answer_fails_within_its_bound_and_names_it() -> None:
    from mineru_vram import EngineError
    from mineru_vram._engine import EngineSettings
    from mineru_vram._engine.backends.attach import AttachBackend

    with socket.socket() as silent:  # accepts connections, never answers: a hung server
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        backend = AttachBackend(EngineSettings.resolve(engine="attach", url=url))
        with pytest.raises(EngineError, match=r"POST /release_memory_occupation .* got no answer \(bound 0.3 s\)"):
            backend.release(0.3)


# --- what the real openai client reads ----------------------------------------------------------


class CountingCompleter:
    """Answers with counted tokens; a prompt of "long" is cut at the limit."""

    def complete(self, request: ChatRequest) -> Completion:
        limit = int(request.sampling.get("max_new_tokens") or 100)
        if request.prompt == "long":
            return Completion("a b c", prompt_tokens=7, completion_tokens=limit, finish_reason="length")
        return Completion("done", prompt_tokens=5, completion_tokens=2)


@pytest.fixture
def openai_client() -> Iterator[Any]:
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    srv = LoopbackServer(CountingCompleter(), model_id="tiny-vlm", api_key="sekret").start()
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sekret", max_retries=0, timeout=10)
    yield client
    client.close()
    srv.shutdown()


def test_the_openai_client_reads_usage_and_the_finish_reason(openai_client: Any) -> None:
    done = openai_client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": "x"}])
    assert done.choices[0].message.content == "done"
    assert done.choices[0].finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (5, 2, 7)
    cut = openai_client.chat.completions.create(
        model="tiny-vlm", messages=[{"role": "user", "content": "long"}], max_tokens=3
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 3


def test_stream_true_gets_events_with_the_same_text(openai_client: Any) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model="tiny-vlm",
            messages=[{"role": "user", "content": "long"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "a b c"
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "length"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_more_than_one_choice_is_refused(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="n=2"):
        openai_client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": "x"}], n=2)


def test_a_plain_text_completer_reports_no_made_up_usage(server: tuple[LoopbackServer, EchoCompleter]) -> None:
    srv, _ = server
    status, body = http.request("POST", f"{srv.url}/v1/chat/completions", api_key="sekret", body=_chat("hi"))
    assert status == 200
    assert "usage" not in body
