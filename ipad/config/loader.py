"""Read a configuration file into a Config, or raise ConfigError naming every bad key."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import attrs

from ipad.config.convert import structure
from ipad.config.manifest import MODULE_NAME
from ipad.config.model import (
    ANYONE,
    HOST_DEPENDENT_MEASURES,
    AccessSettings,
    ClientLimits,
    Config,
    DaemonSettings,
    RestartPolicy,
    SandboxSettings,
)
from ipad.config.problems import ConfigError, Problem, join_key
from ipad.config.search_path import is_plain_name
from ipad.protocol.wire import MAX_PAYLOAD

#: POSIX portable environment variable names.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_config(path: Path, *, proxy_kinds: Collection[str] | None = None) -> Config:
    """Read and validate the configuration at ``path``.

    ``proxy_kinds``, when given, is the set of registered proxy kinds each
    module's ``proxy`` must name. Relative directories in ``[daemon]`` are taken
    relative to the file's own directory, so a checkout's config works from any
    working directory.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(path, "(file)", f"cannot read: {exc}")]) from None
    return parse_config(text, path, proxy_kinds=proxy_kinds)


def parse_config(text: str, path: Path, *, proxy_kinds: Collection[str] | None = None) -> Config:
    """Validate configuration text; ``path`` is used in messages and for relative dirs."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(path, "(toml)", f"invalid TOML: {exc}")]) from None
    config, problems = structure(data, Config, path)
    if config is None:
        raise ConfigError(problems)
    problems = list(_check(config, data, path, proxy_kinds))
    if problems:
        raise ConfigError(problems)
    return _anchor_dirs(config, path.parent.resolve())


def _anchor_dirs(config: Config, base: Path) -> Config:
    daemon = attrs.evolve(
        config.daemon,
        worker_dirs=tuple(base / d for d in config.daemon.worker_dirs),
        module_dirs=tuple(base / d for d in config.daemon.module_dirs),
        trusted_module_dirs=tuple(base / d for d in config.daemon.trusted_module_dirs),
    )
    signatures = attrs.evolve(
        config.signatures, trusted_keys=tuple(base / k for k in config.signatures.trusted_keys)
    )
    return attrs.evolve(config, daemon=daemon, signatures=signatures)


def _check(
    config: Config, data: dict[str, Any], path: Path, proxy_kinds: Collection[str] | None
) -> Iterator[Problem]:
    yield from _check_daemon(config.daemon, path)
    yield from _check_clients(config.clients, path)
    yield from _check_access(config.access, config, path)
    written = set(data.get("restart", {}))
    yield from _check_policy(config.restart, path, "restart", written, blame_defaults=True)
    written = set(data.get("sandbox", {}))
    yield from _check_sandbox(config.sandbox, path, "sandbox", written, blame_defaults=True)
    for name in config.modules:
        written = set(data["modules"][name].get("restart", {}))
        yield from _check_module(config, name, path, proxy_kinds, written)
        written = set(data["modules"][name].get("sandbox", {}))
        key = f"{join_key('modules', name)}.sandbox"
        sandbox = config.sandbox_settings(name)
        yield from _check_sandbox(sandbox, path, key, written, blame_defaults=False)


def _check_daemon(daemon: DaemonSettings, path: Path) -> Iterator[Problem]:
    if daemon.socket is not None and not daemon.socket.is_absolute():
        yield Problem(
            path, "daemon.socket", f"{str(daemon.socket)!r} is relative", "an absolute path"
        )
    # Not anchored at the config file as module_dirs are: a tuning directory is the
    # operator's or a vendor's, never one beside the config by accident.
    for index, directory in enumerate(daemon.tuning_dirs):
        if not directory.is_absolute():
            key = join_key("daemon.tuning_dirs", index)
            yield Problem(path, key, f"{str(directory)!r} is relative", "an absolute path")
    if daemon.metrics_file is not None and not daemon.metrics_file.is_absolute():
        yield Problem(path, "daemon.metrics_file", f"{str(daemon.metrics_file)!r} is relative",
                      "an absolute path (node_exporter's textfile directory)")  # fmt: skip
    if daemon.metrics_interval.seconds < MIN_METRICS_INTERVAL:
        yield Problem(path, "daemon.metrics_interval", f"{daemon.metrics_interval} is too short",
                      f"a duration of at least {MIN_METRICS_INTERVAL:g}s")  # fmt: skip


#: The shortest ``daemon.metrics_interval``: each write reads every worker's board.
MIN_METRICS_INTERVAL = 1.0


#: The smallest message size limit that still lets every request through.
MIN_MESSAGE_SIZE = 1024


def _check_clients(limits: ClientLimits, path: Path) -> Iterator[Problem]:
    for field in ("max_connections", "max_connections_per_user", "max_proxies_per_client",
                  "max_pending_requests", "event_queue"):  # fmt: skip
        value = getattr(limits, field)
        if value < 1:
            yield Problem(path, f"clients.{field}", f"{value} is below 1", "an integer >= 1")
    if not MIN_MESSAGE_SIZE <= limits.max_message_size <= MAX_PAYLOAD:
        size = limits.max_message_size
        yield Problem(path, "clients.max_message_size", f"{size} is out of range",
                      f"{MIN_MESSAGE_SIZE} to {MAX_PAYLOAD} bytes")  # fmt: skip
    if limits.hello_timeout.seconds == 0:
        yield Problem(path, "clients.hello_timeout", "must not be zero", "a positive duration")
    if limits.max_pending_requests <= limits.max_proxies_per_client:
        yield Problem(
            path, "clients.max_pending_requests",
            f"{limits.max_pending_requests} is not above max_proxies_per_client "
            f"{limits.max_proxies_per_client}",
            "more than max_proxies_per_client: after a crash a client reopens all its proxies "
            "at once",
        )  # fmt: skip


def _check_access(access: AccessSettings, config: Config, path: Path) -> Iterator[Problem]:
    """The file's own rules; whether each name exists is checked on the system (config.access)."""
    # (key, names, whether '*' may stand for anyone there)
    lists = [("access.admin_users", access.admin_users, False),
             ("access.admin_groups", access.admin_groups or (), False),
             ("access.proxy_users", access.proxy_users, True),
             ("access.proxy_groups", access.proxy_groups, False)]  # fmt: skip
    for name, rule in access.modules.items():
        key = join_key("access.modules", name)
        if name not in config.modules:
            known = ", ".join(sorted(config.modules)) or "none"
            yield Problem(path, key, f"no module {name!r} is configured", f"one of: {known}")
        lists += [(f"{key}.users", rule.users, True), (f"{key}.groups", rule.groups, False)]
    for key, names, anyone_allowed in lists:
        kind = "user" if key.endswith("users") else "group"
        for index, value in enumerate(names):
            if value == ANYONE and not anyone_allowed:
                where = {"group": "a group name; '*' goes in a users list",
                         "user": "a user name: admin is never open to anyone"}[kind]  # fmt: skip
                yield Problem(path, f"{key}[{index}]", "'*' (anyone) is not allowed here", where)
            elif not value:
                yield Problem(path, f"{key}[{index}]", f"empty {kind} name", f"a {kind} name")


def _check_module(
    config: Config,
    name: str,
    path: Path,
    proxy_kinds: Collection[str] | None,
    written: set[str],
) -> Iterator[Problem]:
    module = config.modules[name]
    key = join_key("modules", name)
    if not MODULE_NAME.fullmatch(name):
        yield Problem(path, key, "invalid module name", "letters, digits, '-' and '_'")
    if proxy_kinds is not None and module.proxy not in proxy_kinds:
        kinds = ", ".join(sorted(proxy_kinds)) or "none"
        yield Problem(
            path, f"{key}.proxy", f"unknown proxy kind {module.proxy!r}", f"registered: {kinds}"
        )
    for field in ("worker", "tuning"):
        value = getattr(module, field)
        if value is not None and not is_plain_name(value):
            yield Problem(
                path,
                f"{key}.{field}",
                f"{value!r} is not a plain file name",
                "a name without '/', searched as docs/configuration.md says",
            )
    for index, variable in enumerate(module.env):
        if not ENV_NAME.fullmatch(variable):
            yield Problem(
                path,
                f"{key}.env[{index}]",
                f"{variable!r} is not a variable name",
                "letters, digits and '_', not starting with a digit",
            )
    if module.fallback is not None:
        other = config.modules.get(module.fallback)
        if module.fallback == name:
            yield Problem(path, f"{key}.fallback", "a module cannot be its own fallback",
                          "the name of another configured module")  # fmt: skip
        elif other is None:
            known = ", ".join(sorted(n for n in config.modules if n != name)) or "none"
            yield Problem(path, f"{key}.fallback", f"no module {module.fallback!r} is configured",
                          f"one of: {known}")  # fmt: skip
        elif not other.enabled and module.enabled:
            yield Problem(path, f"{key}.fallback", f"fallback {module.fallback!r} is disabled",
                          "an enabled module")  # fmt: skip
    # Check the merged policy, but report each problem where the user can fix it.
    policy = config.restart_policy(name)
    yield from _check_policy(policy, path, f"{key}.restart", written, blame_defaults=False)


def _check_policy(
    policy: RestartPolicy, path: Path, key: str, written: set[str], *, blame_defaults: bool
) -> Iterator[Problem]:
    """Check a merged policy and blame a key the user wrote in the table at ``key``.

    A module's table is blamed only for keys it sets itself, so a bad ``[restart]``
    value is reported once, not again for every module that inherits it.
    """

    def mine(*names: str) -> str | None:
        for field in names:
            if field in written:
                return f"{key}.{field}"
        return f"{key}.{names[0]}" if blame_defaults else None

    def problem(names: tuple[str, ...], message: str, expected: str) -> Iterator[Problem]:
        where = mine(*names)
        if where is not None:
            yield Problem(path, where, message, expected)

    if policy.multiplier < 1.0:
        yield from problem(("multiplier",), f"{policy.multiplier} is below 1", "a number >= 1")
    if not 0.0 <= policy.jitter < 1.0:
        yield from problem(("jitter",), f"{policy.jitter} is out of range", "0 <= jitter < 1")
    if policy.max_failures < 1:
        yield from problem(
            ("max_failures",), f"{policy.max_failures} is below 1", "an integer >= 1"
        )
    if policy.initial_delay > policy.max_delay:
        yield from problem(
            ("initial_delay", "max_delay"),
            f"initial_delay {policy.initial_delay} exceeds max_delay {policy.max_delay}",
            "initial_delay <= max_delay",
        )
    for field in (
        "start_timeout",
        "stop_timeout",
        "heartbeat_interval",
        "failure_window",
        "cooldown_interval",
        "call_timeout",
        "served_after",  # zero: a worker dying as it says READY would be restarted flat out
    ):
        if getattr(policy, field).seconds == 0:
            yield from problem((field,), "must not be zero", "a positive duration")
    if policy.heartbeat_timeout <= policy.heartbeat_interval:
        yield from problem(
            ("heartbeat_timeout", "heartbeat_interval"),
            f"heartbeat_timeout {policy.heartbeat_timeout} is not longer than "
            f"heartbeat_interval {policy.heartbeat_interval}",
            "heartbeat_timeout > heartbeat_interval",
        )


#: The range of oom_score_adj a worker may have: never below the default of 0, which
#: would make the kernel prefer killing the daemon or anything else to the worker.
OOM_SCORE_ADJ_RANGE = (0, 1000)
#: A worker needs its four descriptors, a channel per instance and the buffers of a call.
MIN_OPEN_FILES = 16


def _check_sandbox(
    settings: SandboxSettings, path: Path, key: str, written: set[str], *, blame_defaults: bool
) -> Iterator[Problem]:
    """Check a merged sandbox table, blaming keys as ``_check_policy`` does."""

    def where(field: str) -> str | None:
        if field in written or blame_defaults:
            return f"{key}.{field}"
        return None

    problems: list[tuple[str, str, str]] = []
    low, high = OOM_SCORE_ADJ_RANGE
    if not low <= settings.oom_score_adj <= high:
        problems.append(("oom_score_adj", f"{settings.oom_score_adj} is out of range",
                         f"{low} <= oom_score_adj <= {high}"))  # fmt: skip
    if settings.open_files < MIN_OPEN_FILES:
        problems.append(("open_files", f"{settings.open_files} is too few",
                         f"an integer >= {MIN_OPEN_FILES}"))  # fmt: skip
    if settings.processes < 1:
        problems.append(("processes", f"{settings.processes} is below 1", "an integer >= 1"))
    if settings.cpu_seconds < 0:
        problems.append(("cpu_seconds", f"{settings.cpu_seconds} is negative",
                         "seconds of CPU time, or 0 for no limit"))  # fmt: skip
    if not settings.tmp_size.limited:
        problems.append(("tmp_size", "the private /tmp needs a size", 'a size such as "64M"'))
    for index, extra in enumerate(settings.read_only_paths):
        if not extra.is_absolute():
            problems.append((f"read_only_paths[{index}]", f"{str(extra)!r} is relative",
                             "an absolute path"))  # fmt: skip
    for index, measure in enumerate(settings.optional):
        if measure not in HOST_DEPENDENT_MEASURES:
            message = f"{measure!r} is not a measure that may be missing on a host"
            expected = "one of " + ", ".join(HOST_DEPENDENT_MEASURES)
            problems.append((f"optional[{index}]", message, expected))
    for field, message, expected in problems:
        location = where(field.partition("[")[0])
        if location is not None:
            yield Problem(path, location + field[len(field.partition("[")[0]) :], message, expected)
