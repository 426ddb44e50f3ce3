"""Reading a real journal from tests: ``journalctl -o json``, polled until a record turns up."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

Entry = dict[str, Any]

JOURNALCTL = shutil.which("journalctl")

#: How long a record may take to reach journald and its file on a loaded machine.
JOURNAL_WAIT = 30.0


class JournalReader:
    """Runs journalctl (through ``prefix``, e.g. nsenter) with ``args`` that select a journal."""

    def __init__(self, args: Sequence[str], prefix: Sequence[str] = ()) -> None:
        self.args = list(args)
        self.prefix = list(prefix)

    def entries(self, *matches: str) -> list[Entry]:
        """Every entry (all fields, long ones too) matching journalctl ``matches``."""
        command = [*self.prefix, JOURNALCTL or "journalctl", *self.args, "-o", "json", "--all",
                   "--no-pager", *matches]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode not in (0, 1):  # 1: no entries yet (no journal file)
            raise AssertionError(f"{command} failed: {result.stderr}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def wait_for(
        self,
        *matches: str,
        where: Callable[[Entry], bool] = lambda _: True,
        timeout: float = JOURNAL_WAIT,
    ) -> Entry:
        """The first entry matching ``matches`` and ``where``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [entry for entry in self.entries(*matches) if where(entry)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                recent = self.entries(*matches)[-20:] or self.entries()[-20:]
                lines = "\n".join(str(e.get("MESSAGE")) for e in recent)
                raise AssertionError(f"no such journal entry {matches}; the last ones:\n{lines}")
            time.sleep(0.05)
