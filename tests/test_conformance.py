"""The conformance kit (python -m ipad.conformance) against ipad's own peers and broken ones.

ipad's worker host and a client of the contract built on each of ipad's
clients (blocking and trio) must pass every rule; a worker that never answers LOAD, one deaf to
SHUTDOWN and a client that hangs on a bad frame must fail the rule they break.
Whatever the peer does, the kit finishes within its deadline and leaves no
process behind: the test process is made a subreaper while the kit runs, so
anything the kit orphaned comes back to it and is found.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import REPO, children_of
from tests.privileges import as_user, needs_setpriv, user_install

pytestmark = pytest.mark.timeout(180)

PR_SET_CHILD_SUBREAPER = 36
PEERS = Path(__file__).with_name("conformance_peers.py")
CLIENT = Path(__file__).with_name("conformance_client.py")
TRIO_CLIENT = Path(__file__).with_name("conformance_client_trio.py")
WORKER_HOST = [sys.executable, str(REPO / "workers" / "ipad-worker")]
#: Every rule of each mode, in the order the kit reports them.
WORKER_RULES = [
    "start", "load.ready", "ready.fields", "heartbeat", "instance.open", "call.unknown_method",
    "call.serves_after_error", "method.echo", "call.bad_arguments", "method.checksum",
    "buffer.unsealed_refused", "call.fd_count", "malformed.bad_magic", "malformed.truncated",
    "malformed.short", "malformed.wrong_type", "malformed.bad_payload", "malformed.fd_mismatch",
    "malformed.too_many_fds", "malformed.others_unaffected", "channel.eof", "close_instance",
    "control.unsolicited", "shutdown.exit", "control_eof.exit", "sigterm.exit", "parent_death.exit",
]  # fmt: skip
CLIENT_RULES = [
    "client.exit", "client.lines", "client.recovered", "client.released",
    "client.contract", "client.newer_peer", "client.malformed",
]  # fmt: skip


@pytest.fixture
def subreaper() -> Iterator[None]:
    """While the test runs, orphans of the kit's processes are re-parented to this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        left = children_of(os.getpid())
        for pid in left:  # fail below, but never leave them
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert not left, f"the kit left processes behind: {left}"


def run_kit(
    mode: str, command: list[str], *options: str, bound: float, prefix: tuple[str, ...] = ()
) -> tuple[int, list[dict[str, Any]]]:
    """Run the kit with --json (behind ``prefix``), within ``bound`` seconds: status and rules."""
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "ipad.conformance", mode, "--json", *options, "--",
         *command],
        capture_output=True, text=True, cwd=REPO, timeout=bound, check=False,
    )  # fmt: skip
    assert result.stdout, result.stderr
    document = json.loads(result.stdout)
    assert document["passed"] == (result.returncode == 0), document
    return result.returncode, document["rules"]


def not_passed(rules: list[dict[str, Any]]) -> dict[str, str]:
    """Rule name -> verdict, of the rules that did not pass."""
    return {r["rule"]: r["verdict"] for r in rules if r["verdict"] != "PASS"}


def explain(rules: list[dict[str, Any]]) -> str:
    """The rules that did not pass, one a line with what the kit saw: a failure's message."""
    return "\n".join(
        f"{r['verdict']} {r['rule']}: {r['seen']}" for r in rules if r["verdict"] != "PASS"
    )


def verdicts(rules: list[dict[str, Any]]) -> dict[str, str]:
    """Rule name -> PASS, FAIL or SKIP."""
    return {rule["rule"]: rule["verdict"] for rule in rules}


@pytest.mark.parametrize("interval", ["0.25", "0"], ids=["board", "ping"])
def test_ipad_worker_host_passes_every_rule(subreaper: None, interval: str) -> None:
    """The worker host with echo keeps every worker rule, beating on a board or answering PING."""
    status, rules = run_kit("worker", WORKER_HOST, "--heartbeat-interval", interval, bound=60)
    heartbeat = next(r for r in rules if r["rule"] == "heartbeat")
    assert ("PING" in heartbeat["seen"]) == (interval == "0"), heartbeat
    assert [r["rule"] for r in rules] == WORKER_RULES
    assert not_passed(rules) == {}, explain(rules)
    assert status == 0


@pytest.mark.parametrize("script", [CLIENT, TRIO_CLIENT], ids=["blocking", "trio"])
def test_a_client_of_ipads_clients_passes_every_rule(subreaper: None, script: Path) -> None:
    """The contract on each of ipad's clients recovers from every kill and passes every rule.

    ``client.newer_peer`` included: the codec ignores the fields a newer daemon adds.
    """
    status, rules = run_kit("client", [sys.executable, str(script)], bound=150)
    assert [r["rule"] for r in rules] == CLIENT_RULES
    assert not_passed(rules) == {}, explain(rules)
    assert status == 0


def test_a_worker_that_never_answers_load_fails_load_ready(subreaper: None) -> None:
    """A worker silent after LOAD fails load.ready once the start timeout passes; the rest is skipped."""
    status, rules = run_kit(
        "worker", [sys.executable, str(PEERS), "silent"], "--start-timeout", "1", bound=60
    )
    seen = verdicts(rules)
    assert status == 1
    assert seen["start"] == "PASS"
    assert seen["load.ready"] == "FAIL"
    # The bound it failed on is the one given, not a default (the run itself is bounded above).
    load = next(r for r in rules if r["rule"] == "load.ready")
    assert load["seen"].startswith("no READY within 1 s"), load
    assert {v for r, v in seen.items() if r not in {"start", "load.ready"}} == {"SKIP"}


def test_a_worker_deaf_to_shutdown_fails_shutdown_exit(subreaper: None) -> None:
    """A worker that ignores SHUTDOWN fails shutdown.exit only; the kit kills it and goes on."""
    status, rules = run_kit(
        "worker", [sys.executable, str(PEERS), "stubborn"], "--stop-timeout", "1", bound=60
    )
    failed = [r["rule"] for r in rules if r["verdict"] != "PASS"]
    assert failed == ["shutdown.exit"], rules
    assert status == 1


def test_a_worker_that_stops_answering_fails_worker_serves(subreaper: None) -> None:
    """A worker mute after READY fails worker.serves within its bound; the later rules are skipped."""
    status, rules = run_kit(
        "worker", [sys.executable, str(PEERS), "mute"], "--start-timeout", "1", bound=60
    )
    seen = verdicts(rules)
    assert status == 1
    assert seen["load.ready"] == "PASS", rules
    assert seen["worker.serves"] == "FAIL", rules
    assert seen["instance.open"] == "SKIP", rules
    assert seen["sigterm.exit"] == "PASS", rules
    serves = next(r for r in rules if r["rule"] == "worker.serves")
    assert "Timeout:" in serves["seen"], serves  # its reply bound ran out: no hang


def test_a_worker_that_floods_and_escapes_fails_and_leaves_nothing(subreaper: None) -> None:
    """Unsolicited control messages fail control.unsolicited; its escaped process is killed."""
    status, rules = run_kit("worker", [sys.executable, str(PEERS), "noisy"], bound=60)
    seen = verdicts(rules)
    assert status == 1
    assert seen["control.unsolicited"] == "FAIL", rules
    assert seen["kit.no_orphans"] == "FAIL", rules
    assert seen["method.checksum"] == "PASS", rules
    unsolicited = next(r for r in rules if r["rule"] == "control.unsolicited")
    assert len(unsolicited["seen"]) < 1000, unsolicited


def test_a_client_that_hangs_on_a_bad_frame_fails_client_malformed(subreaper: None) -> None:
    """A client that hangs instead of refusing a bad magic fails client.malformed within the bound."""
    status, rules = run_kit("client", [sys.executable, str(CLIENT), "--hang-on-error"], bound=150)
    seen = verdicts(rules)
    assert seen["client.malformed"] == "FAIL", rules
    assert seen["client.contract"] == "PASS", rules
    assert status == 1
    malformed = next(r for r in rules if r["rule"] == "client.malformed")
    assert "hangs" in malformed["seen"] or "neither exited" in malformed["seen"], malformed


def test_a_client_that_gives_up_on_a_crashed_call_fails_client_contract(subreaper: None) -> None:
    """A client that does not make a call its worker died under again breaks the contract."""
    status, rules = run_kit("client", [sys.executable, str(CLIENT), "--no-retry"], bound=150)
    contract = next(r for r in rules if r["rule"] == "client.contract")
    assert contract["verdict"] == "FAIL", explain(rules)
    assert "exit status 1" in contract["seen"], contract
    assert verdicts(rules)["client.malformed"] == "PASS", explain(rules)
    assert status == 1


def test_the_kit_keeps_its_own_deadline(subreaper: None) -> None:
    """Past --deadline the kit stops, fails the run and reaps what it started, whatever the peer."""
    status, rules = run_kit(
        "worker", [sys.executable, str(PEERS), "silent"], "--start-timeout", "60",
        "--deadline", "2", bound=30,
    )  # fmt: skip
    assert status == 1
    # Cut by its own --deadline (2 s), well before the peer's 60 s start timeout: run_kit's
    # bound of 30 s fails the test if the kit waits that out instead.
    deadline = next(r for r in rules if r["rule"] == "kit.deadline")
    assert deadline["verdict"] == "FAIL", rules
    assert "--deadline 2 s" in deadline["seen"], deadline


@needs_setpriv
def test_as_another_user_the_kit_judges_worker_and_client_alike(
    subreaper: None, shared_dir: Path
) -> None:
    """As nobody (no SO_SNDBUFFORCE, a daemon of that user) every rule passes as well."""
    install = user_install()
    nobody = tuple(as_user())
    host = install.prefix / "share" / "ipad" / "workers" / "ipad-worker"
    status, rules = run_kit("worker", [str(install.python), str(host)], bound=60, prefix=nobody)
    assert not_passed(rules) == {}, explain(rules)
    assert status == 0
    script = shared_dir / CLIENT.name
    script.write_text(CLIENT.read_text())
    client = [str(install.python), str(script)]
    status, rules = run_kit("client", client, bound=150, prefix=nobody)
    assert not_passed(rules) == {}, explain(rules)
    assert status == 0
