"""AMQP 0-9-1 frames of a Basic.Publish, encoded byte for byte as py-amqp encodes them.

py-amqp writes each message with its own socket write and encodes header tables through a
generic, slow path. The publisher thread instead encodes a whole group of messages here and
writes it with one `sendall`, so it holds the GIL briefly and releases it once per group.
"""

from __future__ import annotations

from collections.abc import Mapping
from struct import Struct
from typing import Any

from ._protocol import TaskMessage

__all__ = ["encode_table", "publish_frames"]

_FRAME = Struct(">BHI")  # type, channel, size
_FRAME_END = b"\xce"
_METHOD_BASIC_PUBLISH = Struct(">HHH").pack(60, 40, 0)  # class, method, reserved ticket
_CONTENT_HEADER = Struct(">HHQ")  # class, weight, body size
_U8, _U16, _U32 = Struct(">B"), Struct(">H"), Struct(">I")
_I32, _I64, _F64 = Struct(">i"), Struct(">q"), Struct(">d")
_I32_MAX = 2147483647

# Basic properties in py-amqp's order (bit 15 first), the ones a task message uses.
_PROPERTIES = (
    ("content_type", "s", 15),
    ("content_encoding", "s", 14),
    ("application_headers", "F", 13),
    ("delivery_mode", "o", 12),
    ("priority", "o", 11),
    ("correlation_id", "s", 10),
    ("reply_to", "s", 9),
)


def _shortstr(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {text[:40]!r}...")
    return _U8.pack(len(data)) + data


def _item(value: Any, out: list[bytes]) -> None:
    # Same type codes and integer widths as amqp.serialization._write_item.
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out += (b"S", _U32.pack(len(data)), data)
    elif isinstance(value, bytes):
        out += (b"S", _U32.pack(len(value)), value)
    elif isinstance(value, bool):
        out += (b"t", _U8.pack(value))
    elif isinstance(value, float):
        out += (b"d", _F64.pack(value))
    elif isinstance(value, int):
        if value > _I32_MAX or value < -_I32_MAX:
            out += (b"L", _I64.pack(value))
        else:
            out += (b"I", _I32.pack(value))
    elif isinstance(value, dict):
        out.append(b"F")
        out.append(encode_table(value))
    elif isinstance(value, list | tuple):
        items: list[bytes] = []
        for item in value:
            _item(item, items)
        data = b"".join(items)
        out += (b"A", _U32.pack(len(data)), data)
    elif value is None:
        out.append(b"V")
    else:
        raise ValueError(f"an AMQP table cannot hold a {type(value).__name__}: {value!r}")


def encode_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table, with its length prefix."""
    out: list[bytes] = []
    for key, value in table.items():
        out.append(_shortstr(key))
        _item(value, out)
    data = b"".join(out)
    return _U32.pack(len(data)) + data


def _properties(values: Mapping[str, Any]) -> bytes:
    flags = 0
    out: list[bytes] = []
    for name, kind, bit in _PROPERTIES:
        value = values.get(name)
        if value is None:
            continue
        flags |= 1 << bit
        if kind == "s":
            out.append(_shortstr(value))
        elif kind == "o":
            out.append(_U8.pack(value))
        else:
            out.append(encode_table(value))
    return _U16.pack(flags) + b"".join(out)


def publish_frames(
    message: TaskMessage, channel: int, frame_max: int, *, mandatory: bool = True
) -> bytes:
    """The method, content-header and body frames publishing `message`: to its queue through
    the default exchange, or to its own exchange and routing key (native delayed delivery)."""
    method = b"".join(
        (
            _METHOD_BASIC_PUBLISH,
            _shortstr(message.exchange),
            _shortstr(message.routing_key or message.queue),
            _U8.pack(1 if mandatory else 0),
        )
    )
    properties = _properties(
        {
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "application_headers": message.headers,
            "priority": 0,
            **message.properties,
        }
    )
    header = _CONTENT_HEADER.pack(60, 0, len(message.body)) + properties
    frames = [_FRAME.pack(1, channel, len(method)), method, _FRAME_END]
    frames += (_FRAME.pack(2, channel, len(header)), header, _FRAME_END)
    chunk = frame_max - 8
    body = message.body
    for start in range(0, len(body), chunk):
        part = body[start : start + chunk]
        frames += (_FRAME.pack(3, channel, len(part)), part, _FRAME_END)
    return b"".join(frames)
