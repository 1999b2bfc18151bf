"""Which loggers speak, and what a library's log line may carry.

Why: libraries log too, and not for operators. httpx writes a line at INFO for every request,
every etcd call included (more than half of a replica's log), with the full URL, so a
`status_url = ".../status?api_key=..."` put the key in the journal at every reconcile.
botocore at DEBUG logs signed request headers. So the gateway sets third-party loggers
explicitly: httpx's line per request only for a failed request (HTTP 4xx or 5xx) unless the
operator asked for debug, its other loggers at WARNING, and URL query values and user-info
passwords redacted in httpx's lines at every level. asyncssh stays at WARNING always: it
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


class HttpxLines(logging.Filter):
    """httpx's request lines: a failed request (HTTP 4xx/5xx) stays, at INFO, a successful one
    only when debug was asked for; the URL (an argument of the record) always redacted."""

    def __init__(self) -> None:
        super().__init__("httpx")
        self.show_success = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.args, tuple) or not record.args:
            return True
        status = next((a for a in record.args if isinstance(a, int) and 100 <= a <= 599), None)
        if status is not None and status < 400 and not self.show_success:
            return False
        record.args = tuple(redact_url(a) if type(a).__name__ == "URL" else a for a in record.args)
        return True


_HTTPX = HttpxLines()


def redact_http_logs() -> None:
    """Redact httpx's URLs whatever its level, and keep only its failure lines unless asked.
    Every module of ours that makes an httpx client calls this when imported, so no embedding
    or test logging setup can show a query secret or a line per successful request."""
    httpx_log = logging.getLogger("httpx")
    if _HTTPX not in httpx_log.filters:
        httpx_log.addFilter(_HTTPX)


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
    # httpx's own line per request: failures at INFO (see HttpxLines), successes at debug.
    logging.getLogger("httpx").setLevel(logging.DEBUG if debug else logging.INFO)
    _HTTPX.show_success = debug
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
