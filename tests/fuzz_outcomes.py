"""The exit codes of every fuzzed `cfmc check` (tests/frontend/test_fuzz.py), tallied so
that the end of a test run reports them (tests/conftest.py): `fuzzed programs: N checked
(exit 0: a, exit 1: b, exit 2: 0)`. Exit 2 is an internal error, a bug."""
from __future__ import annotations

from collections import Counter

OUTCOMES: Counter = Counter()


def summary(outcomes: Counter) -> str:
    return (f"fuzzed programs: {sum(outcomes.values())} checked (exit 0: {outcomes[0]}, exit 1: {outcomes[1]}, "
            f"exit 2: {outcomes[2]}, other: {sum(v for k, v in outcomes.items() if k not in (0, 1, 2))})")
