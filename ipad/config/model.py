"""The daemon configuration as plain data: frozen attrs classes that know nothing of TOML."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs

from ipad.config.duration import Duration
from ipad.config.size import Size

B = TypeVar("B", bound=attrs.AttrsInstance)


def _override(base: B, table: attrs.AttrsInstance) -> B:
    """``base`` with every key an overrides table sets (is not None) replaced."""
    changes = {k: v for k, v in attrs.asdict(table, recurse=False).items() if v is not None}
    evolved: B = attrs.evolve(cast("Any", base), **changes)
    return evolved


class LogFormat(enum.Enum):
    """Where and how log records are rendered."""

    CONSOLE = "console"
    JSON = "json"
    JOURNAL = "journal"


class LogLevel(enum.Enum):
    """Threshold below which records are dropped."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class RestartMode(enum.Enum):
    """When a worker that exited is started again (the meaning of systemd's Restart=)."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class Isolation(enum.Enum):
    """Which proxies share a worker process (a module's ``isolation``)."""

    #: One worker serves every proxy of the module (with a standby): a crash ends them all.
    MODULE = "module"
    #: Every proxy has a worker of its own: a crash ends only that proxy's instance.
    PROXY = "proxy"


@attrs.frozen
class DaemonSettings:
    """The ``[daemon]`` table."""

    #: None means "the default for this user" (see ipad.config.paths.default_socket_path).
    socket: Path | None = None
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.CONSOLE
    #: Searched after the install directory, before $IPAD_WORKER_PATH.
    worker_dirs: tuple[Path, ...] = ()
    #: Searched after the install directory, before $IPAD_MODULE_PATH.
    module_dirs: tuple[Path, ...] = ()
    #: Fork Python workers from a warm fork server (about 1 ms) instead of starting each
    #: interpreter afresh (tens of milliseconds).
    forkserver: bool = True
    #: Module directories whose code is trusted like ipad's own: the fork server imports
    #: their modules once, so forked workers start with them loaded.
    trusted_module_dirs: tuple[Path, ...] = ()
    #: Absolute directories searched for ``<module>/<file>`` tuning files after
    #: $IPAD_CONFIG_PATH, before the installed ones (ipad/config/tuning.py).
    tuning_dirs: tuple[Path, ...] = ()
    #: The group the daemon gives the socket it creates (mode 0660); None keeps its own.
    socket_group: str | None = None
    #: A file the metrics are written to for node_exporter's textfile collector (None: none).
    metrics_file: Path | None = None
    #: How often ``metrics_file`` is written.
    metrics_interval: Duration = Duration(15.0)


@attrs.frozen
class RestartPolicy:
    """How one module's worker is supervised; the ``[restart]`` table holds the defaults."""

    restart: RestartMode = RestartMode.ON_FAILURE
    #: Delay before the second consecutive restart; the first after a healthy run is immediate.
    initial_delay: Duration = Duration(0.01)
    max_delay: Duration = Duration(30.0)
    multiplier: float = 2.0
    #: Fraction of each delay added or removed at random so crash loops do not march in step.
    jitter: float = 0.1
    #: A worker that stays up this long has its backoff reset.
    stable_after: Duration = Duration(10.0)
    #: A worker that said READY and then ran this long served: when it dies on its own, the
    #: restart is immediate and the failure is not counted towards cooldown (a crash loop is
    #: one of starts that fail, or runs shorter than this).
    served_after: Duration = Duration(1.0)
    #: A loaded standby is promoted at once after any failure: backoff delays new starts only.
    promote_at_once: bool = True
    #: More failures than this within ``failure_window`` put the module in cooldown.
    max_failures: int = 5
    failure_window: Duration = Duration(60.0)
    #: In cooldown, a module is retried at this fixed interval instead of being given up.
    cooldown_interval: Duration = Duration(30.0)
    #: A worker that has not said ``ready`` by then counts as a failed start.
    start_timeout: Duration = Duration(5.0)
    #: Grace between SIGTERM and killing the worker's whole process group or cgroup.
    stop_timeout: Duration = Duration(2.0)
    heartbeat_interval: Duration = Duration(1.0)
    #: A worker that has not answered a heartbeat for this long is hung.
    heartbeat_timeout: Duration = Duration(3.0)
    #: Every call's deadline: a client's default ``timeout``, and past it the daemon
    #: treats the worker as hung (a thread that beats cannot hide a blocked main loop).
    call_timeout: Duration = Duration(10.0)
    #: Keep a second worker started and loaded, promoted the moment the active one ends.
    standby: bool = True


@attrs.frozen
class RestartOverrides:
    """A module's ``restart`` table: any key left out takes the ``[restart]`` value."""

    restart: RestartMode | None = None
    initial_delay: Duration | None = None
    max_delay: Duration | None = None
    multiplier: float | None = None
    jitter: float | None = None
    stable_after: Duration | None = None
    served_after: Duration | None = None
    promote_at_once: bool | None = None
    max_failures: int | None = None
    failure_window: Duration | None = None
    cooldown_interval: Duration | None = None
    start_timeout: Duration | None = None
    stop_timeout: Duration | None = None
    heartbeat_interval: Duration | None = None
    heartbeat_timeout: Duration | None = None
    call_timeout: Duration | None = None
    standby: bool | None = None

    def apply_to(self, base: RestartPolicy) -> RestartPolicy:
        """Return ``base`` with every key this table sets replaced."""
        return _override(base, self)


#: The sandbox measures, by the names ``optional`` and ``ipadctl status`` use.
MEASURES = (
    "user", "user_namespace", "pid_namespace", "network", "ipc", "mounts", "rlimits",
    "no_new_privs", "seccomp", "memory_max", "oom_score_adj", "fds", "environment",
)  # fmt: skip

#: Measures the running kernel or cgroup hierarchy may lack; ``optional`` may name these.
HOST_DEPENDENT_MEASURES = (
    "user_namespace", "pid_namespace", "network", "ipc", "mounts", "seccomp", "memory_max",
)  # fmt: skip


@attrs.frozen
class SandboxSettings:
    """How ``sandboxed`` workers are confined; the ``[sandbox]`` table holds the defaults.

    docs/security.md says what each measure stops; docs/configuration.md, each key.
    """

    #: As root: the user (and group; default its primary group) workers run as.
    user: str = "nobody"
    group: str | None = None
    no_new_privs: bool = True
    #: A network namespace of its own with no interface up: no network at all.
    private_network: bool = True
    #: A PID namespace of its own: it cannot see, signal or trace any other process.
    pid_namespace: bool = True
    #: Private IPC namespace: no System V IPC or POSIX message queues shared with the host.
    private_ipc: bool = True
    #: A read-only view of the system: its module directory and tuning file, the Python
    #: runtime, /usr, and a private writable /tmp, nothing else.
    private_mounts: bool = True
    #: Further host paths to show read-only (absolute), for a module that needs them.
    read_only_paths: tuple[Path, ...] = ()
    tmp_size: Size = Size(64 << 20)
    #: RLIMIT_AS, RLIMIT_NOFILE, RLIMIT_NPROC, RLIMIT_CPU (0: no limit); no core dumps ever.
    address_space: Size = Size(4 << 30)
    open_files: int = 256
    processes: int = 64
    cpu_seconds: int = 0
    #: The worker's cgroup memory limit (memory.max, or cgroup v1 memory.limit_in_bytes).
    memory_max: Size = Size(None)
    #: 0 to 1000: how much rather the kernel's OOM killer picks the worker than others.
    oom_score_adj: int = 500
    seccomp: bool = True
    #: Measures that may be missing on this host: said once at start instead of an error.
    optional: tuple[str, ...] = ()


@attrs.frozen
class SandboxOverrides:
    """A module's ``sandbox`` table: any key left out takes the ``[sandbox]`` value."""

    user: str | None = None
    group: str | None = None
    no_new_privs: bool | None = None
    private_network: bool | None = None
    pid_namespace: bool | None = None
    private_ipc: bool | None = None
    private_mounts: bool | None = None
    read_only_paths: tuple[Path, ...] | None = None
    tmp_size: Size | None = None
    address_space: Size | None = None
    open_files: int | None = None
    processes: int | None = None
    cpu_seconds: int | None = None
    memory_max: Size | None = None
    oom_score_adj: int | None = None
    seccomp: bool | None = None
    optional: tuple[str, ...] | None = None

    def apply_to(self, base: SandboxSettings) -> SandboxSettings:
        """Return ``base`` with every key this table sets replaced."""
        return _override(base, self)


@attrs.frozen
class SignatureSettings:
    """The ``[signatures]`` table: which keys vouch for module code, and whether one must."""

    #: Refuse modules without a valid signature by a trusted key (per module: override).
    require_signature: bool = False
    #: Ed25519 public key files (PEM or raw base64), relative to the configuration file.
    trusted_keys: tuple[Path, ...] = ()


@attrs.frozen
class ModuleSettings:
    """One ``[modules.<name>]`` table."""

    enabled: bool = True
    #: The registered proxy kind (isolation strategy) that runs this module.
    proxy: str = "isolated"
    #: "proxy": a worker per proxy (ipad/daemon/isolation.py); "module": one shared worker.
    isolation: Isolation = Isolation.MODULE
    #: Worker executable name; None takes the one the manifest names.
    worker: str | None = None
    #: Tuning file name, looked up as docs/configuration.md says; None means uncalibrated.toml.
    tuning: str | None = None
    restart: RestartOverrides = RestartOverrides()
    #: Names of the daemon's environment variables a worker may see; all others are dropped.
    env: tuple[str, ...] = ()
    #: Another configured module that serves this one's proxies while it is in cooldown.
    fallback: str | None = None
    #: For proxy = "sandboxed": any ``[sandbox]`` key, for this module only.
    sandbox: SandboxOverrides = SandboxOverrides()
    #: Overrides ``[signatures] require_signature`` for this module.
    require_signature: bool | None = None


@attrs.frozen
class ClientLimits:
    """The ``[clients]`` table: what one connection may cost the daemon.

    Each bound keeps one misbehaving, slow or hostile client from hurting the
    others: beyond it that client gets an error or is cut off, with a reason.
    """

    #: Connections served at once; more are refused with a GOODBYE saying why.
    max_connections: int = 256
    #: Connections one user (peer uid) may hold at once, so one user cannot take them all.
    max_connections_per_user: int = 64
    #: Proxies one connection may hold; REQUEST_PROXY beyond it fails with limit_exceeded.
    max_proxies_per_client: int = 32
    #: Requests of one connection being answered at once; more fail with limit_exceeded.
    max_pending_requests: int = 64
    #: Largest payload of a message a client sends the daemon, in bytes.
    max_message_size: int = 65536
    #: A new connection must say HELLO within this or be dropped.
    hello_timeout: Duration = Duration(5.0)
    #: Events a subscriber may leave unread before it is disconnected.
    event_queue: int = 1024


#: In a list of users: anyone who can connect to the socket.
ANYONE = "*"

#: The admin group when ``admin_groups`` is not set (systemd/sysusers.d makes it), if it exists.
DEFAULT_ADMIN_GROUP = "ipad-admin"


@attrs.frozen
class ModuleAccess:
    """One ``[access.modules.<name>]`` table: who may request proxies to that module."""

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@attrs.frozen
class AccessSettings:
    """The ``[access]`` table: who may do what, by user and group name.

    root and the daemon's own user may always do everything: they could
    signal or replace the daemon anyway.
    """

    #: Who may use the admin operations (restart, reload, stop), besides root.
    admin_users: tuple[str, ...] = ()
    #: None: DEFAULT_ADMIN_GROUP where it exists. Every group written here must exist.
    admin_groups: tuple[str, ...] | None = None
    #: Who may request proxies to a module without a table in ``modules``.
    proxy_users: tuple[str, ...] = (ANYONE,)
    proxy_groups: tuple[str, ...] = ()
    #: Per module, who may request proxies to it instead.
    modules: dict[str, ModuleAccess] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    """A whole, validated configuration and the file it came from."""

    daemon: DaemonSettings = DaemonSettings()
    restart: RestartPolicy = RestartPolicy()
    clients: ClientLimits = ClientLimits()
    access: AccessSettings = AccessSettings()
    sandbox: SandboxSettings = SandboxSettings()
    signatures: SignatureSettings = SignatureSettings()
    modules: dict[str, ModuleSettings] = attrs.field(factory=dict)

    def restart_policy(self, module: str) -> RestartPolicy:
        """The effective restart policy of one module: defaults, then its overrides."""
        return self.modules[module].restart.apply_to(self.restart)

    def sandbox_settings(self, module: str) -> SandboxSettings:
        """The effective sandbox of one module: ``[sandbox]``, then its own table."""
        return self.modules[module].sandbox.apply_to(self.sandbox)

    def signature_required(self, module: str) -> bool:
        """Whether the module must carry a valid signature by a trusted key."""
        own = self.modules[module].require_signature
        return self.signatures.require_signature if own is None else own
