"""The conformance kit judges examples/c's C worker and C client: every rule passes.

This is what proves docs/protocol.md sufficient for C and C++ camera stacks:
the two programs were written from the page alone, and the kit that checks
them drives them only through the protocol, as ipad's daemon and clients do.
The kit runs as a subprocess with --json; the `subreaper` fixture of
tests/test_conformance.py finds anything it left behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_conformance import CLIENT_RULES, WORKER_RULES, run_kit, subreaper
from tests.test_examples_c import EXAMPLES, GCC, c_bin

__all__ = ["c_bin", "subreaper"]  # fixtures

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(GCC is None, reason="gcc is not installed: the C examples cannot be built"),
]


def test_the_c_worker_passes_every_worker_rule(subreaper: None, c_bin: Path) -> None:
    """ipad-echo-worker, loaded as its manifest says (native: no entry point), keeps every rule."""
    tuning = EXAMPLES / "tuning" / "echo_c" / "uncalibrated.toml"
    status, rules = run_kit(
        "worker", [str(c_bin / "ipad-echo-worker")],
        "--module", "echo_c", "--entry-point", "", "--module-dir", str(EXAMPLES),
        "--tuning", str(tuning), bound=90,
    )  # fmt: skip
    assert [r["rule"] for r in rules] == WORKER_RULES
    assert {r["rule"]: r["verdict"] for r in rules if r["verdict"] != "PASS"} == {}, rules
    assert status == 0


def test_the_c_client_passes_every_client_rule(subreaper: None, c_bin: Path) -> None:
    """ipad-echo-client recovers from the kit's worker kills, takes a newer peer, leaves on garbage."""
    status, rules = run_kit(
        "client", [str(c_bin / "ipad-echo-client")], "--calls", "40", "--kills", "3", bound=150
    )
    assert [r["rule"] for r in rules] == CLIENT_RULES
    assert {r["rule"]: r["verdict"] for r in rules if r["verdict"] != "PASS"} == {}, rules
    assert status == 0
