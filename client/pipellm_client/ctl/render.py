"""Formatting shared by the verbs: protobuf -> JSON-able dicts, human units, aligned tables.

`to_dict` is ours rather than `json_format.MessageToDict` because the latter writes 64-bit integers as
strings (the proto3 JSON mapping), which makes `jq '.totals.commits > 0'` silently wrong; here every
integer stays a number and enums become short lower-case names ("pipellm", "h2d").
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _enum_prefix(enum: Any) -> str:
    """MODE_ for Mode, ENDPOINT_KIND_ for EndpointKind: the prefix every value name of the enum carries."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_name(enum: Any, number: int) -> str:
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    name = str(value.name)
    prefix = _enum_prefix(enum)
    return (name[len(prefix) :] if name.startswith(prefix) else name).lower()


# Descriptors are typed loosely: protobuf's stubs and its upb runtime disagree on the classes.
def _value(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_name(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        raise TypeError(f"field {field.full_name} holds bytes; pipellmctl never renders raw bytes")
    return value


def _repeated(field: Any) -> bool:
    # protobuf 7 dropped `label`; older releases lack `is_repeated`.
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def to_dict(msg: Message) -> dict[str, Any]:
    """Every field, defaults included, with proto field names; refuses `bytes` fields on principle."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vf = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(vf, v) for k, v in value.items()}
        elif _repeated(field):
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


def print_json(obj: Any, stream: TextIO | None = None, *, pretty: bool = True) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(obj, indent=2 if pretty else None, sort_keys=False) + "\n")
    stream.flush()


def fmt_bytes(n: float) -> str:
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_rate(bytes_per_s: float) -> str:
    return fmt_bytes(bytes_per_s) + "/s"


def fmt_duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{s:02d}s"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{seconds:.1f}s"


def fmt_percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def fmt_time(epoch_seconds: float) -> str:
    t = datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; the columns in `right` (numbers) are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])
