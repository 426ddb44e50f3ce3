"""Where ipad's own files live, and the default socket path for the running user."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: The ipad package (this file is ipad/config/paths.py).
_PACKAGE_DIR = Path(__file__).resolve().parents[1]

#: In a checkout or an editable install the workers sit next to the package.
_CHECKOUT_INSTALL_DIR = _PACKAGE_DIR.parent / "workers"
#: Its pyproject.toml tells a checkout from a site-packages that happens to hold workers/.
_CHECKOUT_MARKER = _PACKAGE_DIR.parent / "pyproject.toml"
#: An installed wheel puts them here (pyproject's shared-data), like libcamera's IPA_PROXY_DIR.
_PREFIX_INSTALL_DIR = Path(sys.prefix) / "share" / "ipad" / "workers"

#: The system-wide socket, created under systemd's RuntimeDirectory=ipad.
SYSTEM_SOCKET = Path("/run/ipad/ipad.sock")

#: Overrides the configured socket path for the daemon and ipadctl alike.
SOCKET_ENV = "IPAD_SOCKET"


def install_dir() -> Path:
    """The directory of the workers and IPA modules shipped with this ipad.

    Worker executables sit directly in it, module manifests in ``modules/``
    and the shipped tuning files in ``tuning/<module>/``.
    """
    if _CHECKOUT_INSTALL_DIR.is_dir() and _CHECKOUT_MARKER.is_file():
        return _CHECKOUT_INSTALL_DIR
    return _PREFIX_INSTALL_DIR


def install_module_dir() -> Path:
    """Where the shipped module manifests are."""
    return install_dir() / "modules"


def install_tuning_dir() -> Path:
    """Where the shipped tuning files are, one sub-directory per module."""
    return install_dir() / "tuning"


def default_socket_path(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """The socket path used when the configuration names none.

    root gets the system path; any other user gets one under its
    ``$XDG_RUNTIME_DIR`` (falling back to ``/tmp/ipad-<uid>``, which the daemon
    creates with mode 0700) so an unprivileged daemon never needs /run.
    """
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    if uid == 0:
        return SYSTEM_SOCKET
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        return Path(runtime) / "ipad" / "ipad.sock"
    return Path(f"/tmp/ipad-{uid}") / "ipad.sock"  # noqa: S108 - private 0700 directory


def client_socket_path(
    environ: Mapping[str, str] | None = None, euid: int | None = None, system: Path = SYSTEM_SOCKET
) -> Path:
    """The socket a client connects to when told none: $IPAD_SOCKET, else the default.

    A user's default is its own daemon's socket; when no such daemon runs but
    the system service does (ipad.socket), the system socket: so a member of
    group ``ipad`` reaches the service without saying where it is.
    """
    path = socket_path(None, environ, euid)
    env = os.environ if environ is None else environ
    if env.get(SOCKET_ENV) or path == system or path.exists() or not system.exists():
        return path
    return system


def socket_path(
    configured: Path | None, environ: Mapping[str, str] | None = None, euid: int | None = None
) -> Path:
    """The socket to serve or connect to: $IPAD_SOCKET, then the config, then the default."""
    env = os.environ if environ is None else environ
    override = env.get(SOCKET_ENV, "")
    if override:
        return Path(override)
    if configured is not None:
        return configured
    return default_socket_path(env, euid)
