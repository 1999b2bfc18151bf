"""The log formatters (issue 10, item 11), socket-free: field values are quoted, control
characters escaped everywhere, JSON carries the fields raw."""

from __future__ import annotations

import json
import logging
import shlex

from fleetgate.logfmt import JsonFormatter, TextFormatter


def record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("fleetgate.test", logging.INFO, __file__, 1, msg, args, None)


def test_values_with_spaces_quotes_or_equals_stay_one_field():
    line = TextFormatter("%(message)s").format(record(
        "connection closed user=%s machine=%s peer=%s seconds=%.1f",
        'alice peer=203.0.113.9:22 user="bob"', "box", "198.51.100.7:5555", 1.25))
    words = dict(w.split("=", 1) for w in shlex.split(line) if "=" in w)
    assert words == {"user": 'alice peer=203.0.113.9:22 user="bob"', "machine": "box",
                     "peer": "198.51.100.7:5555", "seconds": "1.2"}


def test_newlines_cannot_start_a_forged_line():
    line = TextFormatter("%(message)s").format(record("routing refused user=%s note %s", "a\nb", "x\ny INFO z"))
    assert "\n" not in line
    assert line == 'routing refused user="a\\nb" note x\\ny INFO z'


def test_plain_messages_and_odd_formats_pass_through():
    fmt = TextFormatter("%(message)s")
    assert fmt.format(record("no args %s")) == "no args %s"
    assert fmt.format(record("100%% done n=%d", 3)) == "100% done n=3"
    assert fmt.format(record("empty user=%s", "")) == 'empty user=""'


def test_json_has_the_fields_raw():
    doc = json.loads(JsonFormatter().format(record("routing refused user=%s target=%s n=%d", "alice", "x y=z", 2)))
    assert doc["msg"] == 'routing refused user=alice target="x y=z" n=2'
    assert doc["fields"] == {"user": "alice", "target": "x y=z", "n": 2}
    assert doc["level"] == "INFO" and doc["logger"] == "fleetgate.test"
