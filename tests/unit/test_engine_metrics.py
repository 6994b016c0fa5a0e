"""Keep-alive's "is anyone using the engine" reads Prometheus gauges from a real loopback server."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from mineru_vram._engine.http import metrics_busy

LLAMA = ("llamacpp:requests_processing", "llamacpp:requests_deferred")
VLLM = ("vllm:num_requests_running", "vllm:num_requests_waiting")


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = ""
    status = 200
    seen_auth: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen_auth.append(self.headers.get("Authorization"))
        data = type(self).body.encode()
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    ("body", "names", "busy"),
    [
        ("# HELP llamacpp:requests_processing x\nllamacpp:requests_processing 1\n", LLAMA, True),
        ("llamacpp:requests_processing 0\nllamacpp:requests_deferred 2\n", LLAMA, True),
        ("llamacpp:requests_processing 0\nllamacpp:requests_deferred 0\n", LLAMA, False),
        ('vllm:num_requests_running{model_name="m"} 3.0\n', VLLM, True),
        ('vllm:num_requests_running{model_name="m"} 0.0\nvllm:num_requests_waiting{model_name="m"} 0.0\n', VLLM, False),
        ("vllm:num_requests_running 1\n", LLAMA, False),  # another engine's gauge does not count
        ("llamacpp:requests_processing not-a-number\nllamacpp:requests_processing\n", LLAMA, False),
    ],
)
def test_gauges_above_zero_mean_busy(server: str, body: str, names: tuple[str, ...], busy: bool) -> None:
    _Metrics.body, _Metrics.status = body, 200
    _Metrics.seen_auth.clear()
    assert metrics_busy(server, names, api_key="k", timeout=5) is busy
    assert _Metrics.seen_auth == ["Bearer k"]


def test_an_error_or_no_server_is_not_busy(server: str) -> None:
    _Metrics.body, _Metrics.status = "llamacpp:requests_processing 1\n", 401
    assert metrics_busy(server, LLAMA, api_key=None, timeout=5) is False
    assert metrics_busy("http://127.0.0.1:9", LLAMA, api_key=None, timeout=1) is False
