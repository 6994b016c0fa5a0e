"""Stored results in a format that cannot run code: a JSON header, then the images' raw bytes.

A pickle would run whatever code its bytes name when loaded, so a result file
someone else managed to swap would run their code as the queue's owner. This
format is read with :func:`json.loads` and byte slicing only; anything that does
not match it exactly raises :class:`ValueError`.

Layout::

    b"mineru-vram result 1\\n"
    8 bytes, big-endian: the header's length N
    N bytes: UTF-8 JSON {"result": {...ParseResult fields but images...}, "images": [[name, size], ...]}
    the images' bytes, back to back, in the header's order (nothing after them)
"""

from __future__ import annotations

import json
from typing import Any

from mineru_vram._result import ParseResult

__all__ = ["MAGIC", "decode_result", "encode_result"]

MAGIC = b"mineru-vram result 1\n"
_LENGTH_BYTES = 8

# Field name -> the JSON types it may have once read back.
_FIELDS: dict[str, tuple[type, ...]] = {
    "document": (str,),
    "markdown": (str,),
    "content_list": (list, dict, str, int, float, bool, type(None)),
    "middle_json": (dict,),
    "page_count": (int,),
    "seconds": (int, float),
    "backend": (str,),
    "device": (str,),
    "model_output": (dict, type(None)),
    "timings": (dict,),
}


def encode_result(result: ParseResult) -> bytes:
    """The bytes of a stored result."""
    fields = {name: getattr(result, name) for name in _FIELDS}
    fields["timings"] = dict(result.timings)
    images = [(str(name), bytes(data)) for name, data in result.images.items()]
    header = {"result": fields, "images": [[name, len(data)] for name, data in images]}
    text = json.dumps(header, ensure_ascii=False, default=_plain).encode("utf-8")
    return b"".join([MAGIC, len(text).to_bytes(_LENGTH_BYTES, "big"), text, *(data for _, data in images)])


def decode_result(data: bytes) -> ParseResult:
    """Read back what :func:`encode_result` wrote.

    Raises:
        ValueError: the bytes are not a result in this format (damaged, cut short,
            from another program, or a pickle).
    """
    if not data.startswith(MAGIC):
        raise ValueError("it does not start with the queue's result header")
    start = len(MAGIC) + _LENGTH_BYTES
    if len(data) < start:
        raise ValueError("it is cut short")
    size = int.from_bytes(data[len(MAGIC) : start], "big")
    if size > len(data) - start:
        raise ValueError("it is cut short")
    try:
        header = json.loads(data[start : start + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"its header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict) or not isinstance(header.get("result"), dict):
        raise ValueError("its header has no result")
    fields = header["result"]
    if set(fields) != set(_FIELDS):
        raise ValueError("its header has other fields than a result's")
    for name, types in _FIELDS.items():
        value = fields[name]
        if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
            raise ValueError(f"its field {name!r} has the wrong type")
    if not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in fields["timings"].items()):
        raise ValueError("its timings are not numbers")
    entries = header.get("images")
    if not isinstance(entries, list):
        raise ValueError("its header has no image list")
    images: dict[str, bytes] = {}
    offset = start + size
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], int)
            or entry[1] < 0
            or entry[0] in images
        ):
            raise ValueError("its image list is malformed")
        name, length = entry
        if offset + length > len(data):
            raise ValueError("it is cut short")
        images[name] = data[offset : offset + length]
        offset += length
    if offset != len(data):
        raise ValueError("it has bytes after its last image")
    return ParseResult(images=images, **fields)


def _plain(value: Any) -> Any:
    """JSON for values MinerU's output may hold that :mod:`json` does not know (numpy numbers, arrays)."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
