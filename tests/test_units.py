"""The shipped unit files: their security score, and that they agree with the code."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess

import pytest

from ipad.config.model import DEFAULT_ADMIN_GROUP
from ipad.config.paths import SYSTEM_SOCKET
from tests.daemon_process import REPO

UNITS = REPO / "systemd"
ANALYZE = shutil.which("systemd-analyze")

#: The most `systemd-analyze security` may report for ipad.service (issue 7).
MAX_EXPOSURE = 2.0


def unit(name: str) -> configparser.RawConfigParser:
    """A unit file's settings (the last value of a repeated key)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign] # keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.timeout(60)
@pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (systemd 252 or later)")
def test_security_exposure_is_at_most_two() -> None:
    """`systemd-analyze security` rates the shipped ipad.service 2.0 or better."""
    result = subprocess.run(
        [ANALYZE or "systemd-analyze", "security", "--offline=yes", str(UNITS / "ipad.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for ipad\.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_socket_unit_and_code_agree_on_the_path() -> None:
    """ipad.socket listens where the daemon and ipadctl look for the system socket."""
    socket_unit = unit("ipad.socket")
    assert socket_unit["Socket"]["ListenSequentialPacket"] == str(SYSTEM_SOCKET)
    assert socket_unit["Socket"]["SocketMode"] == "0660"
    assert socket_unit["Socket"]["Accept"] == "no"
    service = unit("ipad.service")
    assert service["Service"]["Environment"] == f"IPAD_SOCKET={SYSTEM_SOCKET}"
    assert service["Service"]["RuntimeDirectory"] == SYSTEM_SOCKET.parent.name


def test_the_service_user_is_the_one_sysusers_makes() -> None:
    """User=, the socket's group and the default admin group are made by the sysusers.d file."""
    text = (UNITS / "sysusers.d" / "ipad.conf").read_text()
    entries = [line.split()[:2] for line in text.splitlines() if line and not line.startswith("#")]
    assert entries == [["u", "ipad"], ["g", DEFAULT_ADMIN_GROUP]]
    service = unit("ipad.service")["Service"]
    assert (service["User"], service["Group"]) == ("ipad", "ipad")
    assert unit("ipad.socket")["Socket"]["SocketGroup"] == "ipad"
