"""The secrets the tests give the gateway, so that every log line of the suite is checked for them.

A test that configures a secret (an API key in a URL, a bearer token, a password, a cloud
secret key) names it with `token("...")`. conftest.py looks for each in every log record the
tests' in-process gateways emit (at the level the CLI runs, INFO) and in every `*.log` a test
leaves in its tmp_path (gateways run as real processes): one found fails the test that logged it.
Strings a backend itself prints (a command's stderr) are not configuration and may be logged
for the operator; tests use other strings for those.
"""

from __future__ import annotations

TOKENS: set[str] = set()


def token(value: str) -> str:
    TOKENS.add(value)
    return value


def found_in(text: str) -> list[str]:
    return sorted(t for t in TOKENS if t in text)
