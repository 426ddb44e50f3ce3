"""The kit's verdicts: one line per rule, PASS, FAIL or SKIP, and what was seen."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Literal, TextIO

Verdict = Literal["PASS", "FAIL", "SKIP"]

#: The longest ``seen`` text kept: a peer's output is untrusted and may be huge.
MAX_SEEN = 400


def bounded(text: str, limit: int = MAX_SEEN) -> str:
    """``text`` on one line, cut to ``limit`` characters with a mark of what went."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One rule checked: its verdict and what the kit saw."""

    rule: str
    verdict: Verdict
    seen: str


class Report:
    """Outcomes in the order the rules were checked, printed as they come (unless JSON)."""

    def __init__(self, *, as_json: bool, out: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self.out = out
        self.outcomes: list[Outcome] = []

    def add(self, rule: str, passed: bool, seen: str) -> bool:
        """Record a PASS or a FAIL; return ``passed``, so a caller can go on only if it held."""
        return self._record(rule, "PASS" if passed else "FAIL", seen) == "PASS"

    def skip(self, rule: str, why: str) -> None:
        """A rule that could not be checked (a rule it needs failed, or it does not apply)."""
        self._record(rule, "SKIP", why)

    def _record(self, rule: str, verdict: Verdict, seen: str) -> Verdict:
        outcome = Outcome(rule, verdict, bounded(seen))
        self.outcomes.append(outcome)
        if not self.as_json:
            print(f"{verdict} {rule}: {outcome.seen}", file=self.out, flush=True)
        return verdict

    def failed(self) -> list[str]:
        """The rules that failed."""
        return [o.rule for o in self.outcomes if o.verdict == "FAIL"]

    def finish(self, mode: str) -> int:
        """Print the JSON document if asked; the exit status: 0 only if no rule failed."""
        status = 1 if self.failed() else 0
        if self.as_json:
            document = {
                "mode": mode,
                "passed": status == 0,
                "rules": [dataclasses.asdict(o) for o in self.outcomes],
            }
            print(json.dumps(document, indent=1), file=self.out, flush=True)
        return status
