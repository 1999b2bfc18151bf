"""Library log lines: what an operator's journal gets from httpx (issues 19 and 25)."""

from __future__ import annotations

import logging

import httpx
import pytest

from fleetgate import logsetup
from logsecrets import token

KEY = token("sk-logsetup-5d2a")


def request_line(status: int) -> logging.LogRecord:
    """The record httpx itself makes for one request (httpx._client, `HTTP Request: ...`)."""
    url = httpx.URL(f"http://user:pw-{KEY}@api.internal:5000/status?api_key={KEY}&vm=box1")
    return logging.LogRecord("httpx", logging.INFO, "_client.py", 1, 'HTTP Request: %s %s "%s %d %s"',
                             ("GET", url, "HTTP/1.1", status, "Reason"), None)


@pytest.fixture
def policy():
    yield
    logsetup.quiet_libraries(debug=False)


@pytest.mark.parametrize("debug", [False, True])
def test_success_only_at_debug_failures_always_and_never_a_secret(policy, debug):
    logsetup.quiet_libraries(debug=debug)
    httpx_log = logging.getLogger("httpx")
    ok, failed = request_line(200), request_line(503)
    assert httpx_log.filter(ok) is debug
    assert httpx_log.filter(failed) is True
    for record in (ok, failed) if debug else (failed,):
        text = record.getMessage()
        assert KEY not in text
        assert "api_key=REDACTED" in text and "user:REDACTED@api.internal:5000" in text
    assert httpx_log.isEnabledFor(logging.DEBUG) is debug
    assert httpx_log.isEnabledFor(logging.INFO)


def test_libraries_that_log_credentials_stay_at_warning(policy):
    logsetup.quiet_libraries(debug=True)
    for name in ("botocore", "boto3", "urllib3", "asyncssh"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.DEBUG
    logsetup.quiet_libraries(debug=False)
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.WARNING


def test_redact_url_keeps_what_an_operator_needs():
    assert logsetup.redact_url("http://10.0.0.1:5000/start_vm") == "http://10.0.0.1:5000/start_vm"
    assert logsetup.redact_url("https://a:b@h/p?x=1&x=2&y=3") == "https://a:REDACTED@h/p?x=REDACTED&x=REDACTED&y=REDACTED"
