"""Warm schedules: "mon-fri 08:00-19:00" keeps a machine up (and pre-wakes it) in office hours.

Kept deliberately small: day ranges or lists and one time range per rule, in the gateway's
local time; a rule whose end is before its start runs over midnight.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RULE = re.compile(r"^\s*(?P<days>[a-z,\-]+|daily)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class WarmRule:
    days: frozenset[int]   # 0 = Monday
    start: int             # minutes after midnight
    end: int

    def active(self, when: dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute
        if self.start <= self.end:
            return when.weekday() in self.days and self.start <= minute < self.end
        # Over midnight: the part after midnight belongs to the previous day's rule.
        if when.weekday() in self.days and minute >= self.start:
            return True
        return (when.weekday() - 1) % 7 in self.days and minute < self.end


def _minutes(text: str) -> int:
    h, m = (int(x) for x in text.split(":"))
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ScheduleError(f"'{text}' is not a time of day (HH:MM)")
    return h * 60 + m


def _days(text: str) -> frozenset[int]:
    if text == "daily":
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        if a not in DAYS or (b and b not in DAYS):
            raise ScheduleError(f"'{part}' is not a day or day range (use mon..sun, e.g. mon-fri or sat,sun)")
        i, j = DAYS.index(a), DAYS.index(b or a)
        out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
    return frozenset(out)


def parse_rule(text: str) -> WarmRule:
    m = _RULE.match(text.lower())
    if not m:
        raise ScheduleError(f"'{text}' is not a schedule like 'mon-fri 08:00-19:00' or 'daily 07:30-09:00'")
    start, end = _minutes(m["start"]), _minutes(m["end"])
    if start == end:
        raise ScheduleError(f"'{text}' starts and ends at the same time")
    return WarmRule(_days(m["days"]), start, end)


def is_warm(rules: tuple[WarmRule, ...], when: dt.datetime) -> bool:
    return any(r.active(when) for r in rules)
