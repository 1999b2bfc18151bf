"""Which loggers speak, and what a library's log line may carry.

Why: libraries log too, and not for operators. httpx writes a line at INFO for every request,
every etcd call included (more than half of a replica's log), with the full URL, so a
`status_url = ".../status?api_key=..."` put the key in the journal at every reconcile.
botocore at DEBUG logs signed request headers. So the gateway sets third-party loggers
explicitly: at WARNING unless the operator asked for debug, and even then with URL query
values and user-info passwords redacted in httpx's lines. asyncssh stays at WARNING always: it
logs every channel request at INFO, and the relay's own lines say what an operator needs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# Libraries whose INFO/DEBUG lines are request-level noise, some with secrets in them.
CHATTY = ("httpx", "httpcore", "h11", "hpack")
# Never below WARNING: their DEBUG output carries credentials (signed headers, key material).
NEVER_DEBUG = ("asyncssh", "botocore", "boto3", "s3transfer", "urllib3", "libvirt")


def redact_url(url: Any) -> str:
    """A URL as a log may show it: every query value and a password replaced by REDACTED."""
    import httpx

    try:
        u = httpx.URL(str(url))
    except Exception:  # not a URL after all: say nothing of it
        return "<url>"
    if u.query:
        params = [(k, "REDACTED") for k, _ in httpx.QueryParams(u.query).multi_items()]
        u = u.copy_with(query=str(httpx.QueryParams(params)).encode())
    if u.password:
        u = u.copy_with(username=u.username, password="REDACTED")
    return str(u)


class RedactHttpx(logging.Filter):
    """httpx's request lines with their URL redacted (it passes the URL as an argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact_url(a) if type(a).__name__ == "URL" else a for a in record.args)
        return True


_REDACT = RedactHttpx()


def redact_http_logs() -> None:
    """Redact httpx's URLs whatever its level. Every module of ours that makes an httpx client
    calls this when imported, so no embedding or test logging setup can show a query secret."""
    httpx_log = logging.getLogger("httpx")
    if _REDACT not in httpx_log.filters:
        httpx_log.addFilter(_REDACT)


def quiet_libraries(debug: bool | None = None) -> None:
    """Set the third-party loggers' levels; `debug` defaults to whether the root logger is at DEBUG.

    Idempotent: the CLI calls it when it sets up logging, and App.run again (an embedding
    program that configured logging itself gets the same policy)."""
    if debug is None:
        debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    for name in NEVER_DEBUG:
        logging.getLogger(name).setLevel(logging.WARNING)
    redact_http_logs()


def configure(level: str, fmt: str = "text") -> None:
    """The CLI's logging: one stderr handler with unforgeable fields, libraries quieted."""
    from .logfmt import formatter

    # Field values are quoted (or JSON): a client-chosen login name cannot forge fields.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, handlers=[handler])
    quiet_libraries(numeric <= logging.DEBUG)
