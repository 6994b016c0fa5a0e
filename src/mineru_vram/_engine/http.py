"""One HTTP request to a loopback engine server, standard library only."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["find_key", "metrics_busy", "request"]


def request(
    method: str, url: str, *, api_key: str | None = None, body: Any = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One request with urllib, never through a proxy (these are loopback servers).

    Returns:
        ``(status, parsed body)``: JSON when the body is JSON, else its text.

    Raises:
        OSError: no answer came (``URLError``, a timeout, a reset connection).
    """
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - http:// only
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return status, parsed


def find_key(data: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in nested dicts (SGLang may nest server args)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = find_key(value, key)
            if found is not None:
                return found
    return None


def metrics_busy(url: str, names: tuple[str, ...], *, api_key: str | None, timeout: float) -> bool:
    """Whether any of the Prometheus gauges ``names`` at ``url/metrics`` is above zero.

    Labels (``name{model="..."} 2.0``) are ignored. A server that does not answer, answers an
    error or has none of the gauges counts as not busy: keep-alive then goes by its own clock.
    """
    try:
        status, body = request("GET", f"{url}/metrics", api_key=api_key, timeout=timeout)
    except OSError:
        return False
    if status != 200 or not isinstance(body, str):
        return False
    for line in body.splitlines():
        name = line.partition("{")[0].partition(" ")[0]
        if name in names:
            try:
                if float(line.rsplit(" ", 1)[1]) > 0:
                    return True
            except (ValueError, IndexError):
                continue
    return False
