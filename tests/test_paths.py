"""Default paths: where the socket goes for root and for other users."""

from __future__ import annotations

from pathlib import Path

from ipad.config.paths import client_socket_path, default_socket_path, install_dir, socket_path

REPO = Path(__file__).resolve().parent.parent


def test_root_uses_run() -> None:
    """Root's default socket is the system one systemd's RuntimeDirectory creates."""
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/0"}, euid=0) == Path(
        "/run/ipad/ipad.sock"
    )


def test_user_uses_xdg_runtime_dir() -> None:
    """Another user's default socket lives in its runtime directory."""
    path = default_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"}, euid=1000)
    assert path == Path("/run/user/1000/ipad/ipad.sock")


def test_user_without_runtime_dir_falls_back_to_private_tmp() -> None:
    """Without an (absolute) XDG_RUNTIME_DIR a per-uid directory under /tmp is used."""
    assert default_socket_path({}, euid=1000) == Path("/tmp/ipad-1000/ipad.sock")
    assert default_socket_path({"XDG_RUNTIME_DIR": "rel"}, euid=1000) == Path(
        "/tmp/ipad-1000/ipad.sock"
    )


def test_ipad_socket_overrides_config() -> None:
    """$IPAD_SOCKET wins over the configured path, which wins over the default."""
    configured = Path("/srv/ipad.sock")
    assert socket_path(configured, {"IPAD_SOCKET": "/x/y.sock"}, euid=0) == Path("/x/y.sock")
    assert socket_path(configured, {"IPAD_SOCKET": ""}, euid=0) == configured
    assert socket_path(None, {}, euid=0) == Path("/run/ipad/ipad.sock")


def test_checkout_install_dir_is_workers() -> None:
    """Run from a checkout (or an editable install), the install directory is workers/."""
    assert install_dir() == REPO / "workers"


def test_a_client_finds_the_system_service_when_no_own_daemon_runs(tmp_path: Path) -> None:
    """A group member's ipadctl reaches the system socket if its own daemon's is not there."""
    system = tmp_path / "run" / "ipad.sock"
    runtime = tmp_path / "user"
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    own = runtime / "ipad" / "ipad.sock"
    assert client_socket_path(env, euid=1000, system=system) == own  # neither runs
    system.parent.mkdir()
    system.touch()
    assert client_socket_path(env, euid=1000, system=system) == system
    own.parent.mkdir(parents=True)
    own.touch()
    assert client_socket_path(env, euid=1000, system=system) == own  # its own daemon runs
    assert client_socket_path({**env, "IPAD_SOCKET": "/x.sock"}, euid=1000, system=system) == (
        Path("/x.sock")
    )
