"""Log lines whose fields cannot be forged: quoted key=value text, or JSON.

fleetgate logs `key=value` pairs (`routing refused user=%s target=%s`), and some values
come from the client: a login name `alice+x peer=203.0.113.9:22 user=bob` would print as
three fields. The formatters here render each `key=%s` value so that it stays one value:

- text (the default): a value with a space, `"`, `=`, `\\` or a control character is
  written as a double-quoted string with those escaped (logfmt's convention, which
  Loki, Vector and `shlex.split` read back); control characters (a newline that would
  start a forged log line) are escaped in every argument, not only in fields;
- JSON (`--log-format json`): one object per line, the message as text plus `fields`,
  the `key=%s` pairs with their raw values.

Nothing at the call sites changes: the format string already says which argument is a
field (`key=` just before the `%s`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

SPEC_RE = re.compile(r"%(?:\((?P<name>[^)]*)\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?(?P<conv>[diouxXeEfFgGcrsa%])")
KEY_BEFORE_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)=$")
NEEDS_QUOTES_RE = re.compile(r'[\s"=\\]|[^\x20-\x7e\u00a0-\U0010ffff]')
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quote(value: str) -> str:
    """A value as one logfmt field: bare if safe, else double-quoted with escapes."""
    if value and not NEEDS_QUOTES_RE.search(value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _escape_controls(value: str) -> str:
    return CONTROL_RE.sub(lambda m: json.dumps(m.group())[1:-1], value)


def render(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """(the message with field values quoted, {key: raw value} of its key=%s fields)."""
    msg = str(record.msg)
    args = record.args
    if not args or isinstance(args, dict) and not args:
        return msg, {}
    if isinstance(args, dict) or not isinstance(args, tuple):
        try:
            return _escape_controls(msg % args), {}
        except (TypeError, ValueError, KeyError):
            return record.getMessage(), {}
    out: list[str] = []
    fields: dict[str, Any] = {}
    pos = 0
    i = 0
    try:
        for m in SPEC_RE.finditer(msg):
            out.append(msg[pos:m.start()])
            pos = m.end()
            spec = m.group()
            if m.group("conv") == "%":
                out.append("%")
                continue
            if "*" in spec or m.group("name") is not None:
                raise ValueError("unsupported spec")
            arg = args[i]
            i += 1
            text = spec % (arg,)
            key = KEY_BEFORE_RE.search(msg, 0, m.start())
            if key is not None and key.end() == m.start():
                fields[key.group(1)] = arg if isinstance(arg, (int, float, bool)) or arg is None else str(arg)
                text = quote(text) if m.group("conv") in "sra" else text
            else:
                text = _escape_controls(text)
            out.append(text)
        if i != len(args):
            raise ValueError("argument count")
    except (TypeError, ValueError, IndexError):
        return _escape_controls(record.getMessage()), {}
    out.append(msg[pos:])
    return "".join(out), fields


class TextFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(name)s: %(message)s` with field values quoted."""

    def __init__(self, fmt: str = TEXT_FORMAT):
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        message, _ = render(record)
        copy = logging.makeLogRecord({**record.__dict__, "msg": message, "args": None})
        return super().format(copy)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, fields (and exc with a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        message, fields = render(record)
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                               "msg": message}
        if fields:
            doc["fields"] = fields
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    return TextFormatter()
