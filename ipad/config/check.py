"""Whole-configuration checks: the file itself, then what it refers to on disk.

``ipad --check-config`` and daemon start-up run the same checks, so a config
that passes the check does not fail at start for a missing manifest, worker
executable or tuning file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ipad.config.access import Resolved, resolve_access
from ipad.config.discovery import Discovery, discover_modules
from ipad.config.loader import load_config
from ipad.config.manifest import ModuleSource
from ipad.config.model import Config
from ipad.config.paths import install_tuning_dir
from ipad.config.problems import ConfigError, Problem, join_key
from ipad.config.proxy_kinds import REGISTRY, ProxyRegistry
from ipad.config.resolve import WorkerNotFound, resolve_worker
from ipad.config.sandbox_plan import ModuleFiles, Unavailable
from ipad.config.search_path import dirs_from_env
from ipad.config.tuning import CONFIG_PATH_ENV, TuningFileNotFound, find_tuning_file
from ipad.protocol.wire import SandboxSpec

if TYPE_CHECKING:
    from ipad.config.signing import Verified


@attrs.frozen
class ModulePlan:
    """Everything needed to run one enabled module, all of it found and checked."""

    name: str
    source: ModuleSource
    worker: Path
    tuning: Path
    #: What its workers confine themselves in (proxy kind ``sandboxed``), if anything.
    sandbox: SandboxSpec | None = None
    #: Optional sandbox measures this host lacks (logged once at start).
    unavailable: tuple[Unavailable, ...] = ()
    #: (relative path, SHA-256) of each file its verified signature covers; None: not signed.
    #: Its workers import only these bytes (ipad/worker/verified_import.py), and a reload that
    #: finds other digests sees the module changed.
    signed: tuple[tuple[str, str], ...] | None = None


@attrs.frozen
class CheckedConfig:
    """A configuration together with the modules it will run."""

    config: Config
    path: Path
    discovery: Discovery
    plans: dict[str, ModulePlan]
    #: The access policy and socket group, every name looked up on this system.
    access: Resolved


def check_config(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    registry: ProxyRegistry = REGISTRY,
) -> CheckedConfig:
    """Load ``path`` and check every enabled module; raise ConfigError listing all problems."""
    env = os.environ if environ is None else environ
    config = load_config(path, proxy_kinds=registry.names())
    discovery = discover_modules(module_dirs=config.daemon.module_dirs, environ=env)
    plans: dict[str, ModulePlan] = {}
    access, problems = resolve_access(config, path)
    keys = TrustedKeys(config, path)
    problems.extend(keys.problems)
    workers = _Workers(config, env, registry)
    for name, settings in config.modules.items():
        if not settings.enabled:
            continue
        plan, found = _plan(config, path, name, discovery, env, workers)
        if plan is not None:
            signature = keys.check(name, plan.source, required=config.signature_required(name))
            if isinstance(signature, Problem):
                plan, found = None, [*found, signature]
            elif signature is not None:
                plan = attrs.evolve(plan, signed=signature.digests)
        if plan is not None:
            plans[name] = plan
        problems.extend(found)
    if problems or access is None:
        raise ConfigError(problems)
    return CheckedConfig(config=config, path=path, discovery=discovery, plans=plans, access=access)


class TrustedKeys:
    """The configured public keys, loaded once per check; signatures checked against them."""

    def __init__(self, config: Config, path: Path) -> None:
        self.problems: list[Problem] = []
        self.keys: list[Any] = []
        for index, key_path in enumerate(config.signatures.trusted_keys):
            from ipad.config.signing import SignatureError, load_public_key  # noqa: PLC0415 - cryptography

            try:
                self.keys.append(load_public_key(key_path))
            except (OSError, SignatureError) as exc:
                reason = exc.reason if isinstance(exc, SignatureError) else str(exc)
                where = f"signatures.trusted_keys[{index}]"
                self.problems.append(Problem(path, where, f"{key_path}: {reason}"))

    def check(
        self, name: str, source: ModuleSource, *, required: bool
    ) -> Problem | Verified | None:
        """Why the module must be refused, or its verified signature (None: unsigned, allowed).

        A signature that is present is checked even when none is required: a
        signed module that no longer matches its signature has been tampered with.
        """
        from ipad.config.signing import SignatureError, signature_path, verify  # noqa: PLC0415

        if not required and not signature_path(source.path).exists():
            return None
        try:
            return verify(source, self.keys)
        except SignatureError as exc:
            return Problem(exc.file, "(signature)", f"module {name}: {exc.reason}")


class _Workers:
    """Worker executables resolved once per name and proxy kind, for one check.

    Most modules run the same worker: resolving it (and reading it, to tell a
    Python script) for each of 200 modules was a fifth of checking them.
    """

    def __init__(self, config: Config, environ: Mapping[str, str], registry: ProxyRegistry) -> None:
        self.config = config
        self.environ = environ
        self.registry = registry
        self._found: dict[tuple[str, str], tuple[Path | None, WorkerNotFound | None, list[str]]]
        self._found = {}

    def resolve(self, name: str, kind: str) -> tuple[Path, list[str]]:
        """The worker's path and why the kind cannot start it; WorkerNotFound if none is usable."""
        found = self._found.get((name, kind))
        if found is None:
            try:
                worker = resolve_worker(
                    name, extra_dirs=self.config.daemon.worker_dirs, environ=self.environ
                )
            except WorkerNotFound as exc:
                found = (None, exc, [])
            else:
                found = (worker, None, self.registry.create(kind).problems(worker))
            self._found[(name, kind)] = found
        path, error, reasons = found
        if error is not None:
            raise error
        assert path is not None  # noqa: S101 - set whenever there is no error
        return path, reasons


def _plan(
    config: Config,
    path: Path,
    name: str,
    discovery: Discovery,
    environ: Mapping[str, str],
    workers: _Workers,
) -> tuple[ModulePlan | None, list[Problem]]:
    key = join_key("modules", name)
    settings = config.modules[name]
    source = discovery.modules.get(name)
    if source is None:
        searched = ", ".join(str(d) for d in discovery.searched) or "no directories"
        missing = [Problem(path, key, f"no manifest {name}.toml found", f"searched: {searched}")]
        # A manifest that exists but is broken explains the miss better than the search list.
        for rejected in discovery.rejected:
            missing.extend(p for p in rejected.problems if p.file.stem == name)
        return None, missing
    worker_name = settings.worker or source.manifest.worker
    worker: Path | None = None
    tuning: Path | None = None
    problems: list[Problem] = []
    try:
        worker, reasons = workers.resolve(worker_name, settings.proxy)
        for reason in reasons:
            problems.append(Problem(path, f"{key}.worker", reason))
            worker = None
    except WorkerNotFound as exc:
        tried = "; ".join(f"{a.path}: {a.reason}" for a in exc.attempts) or "no directories"
        problems.append(
            Problem(
                path,
                f"{key}.worker",
                f"no usable worker executable {worker_name!r}",
                f"tried {tried}",
            )
        )
    try:
        tuning = find_tuning_file(name, settings.tuning, environ=environ,
                                  tuning_dirs=config.daemon.tuning_dirs)  # fmt: skip
    except TuningFileNotFound as exc:
        tried = "; ".join(str(p) for p in exc.tried) or "no path"
        problems.append(Problem(path, f"{key}.tuning", "no tuning file found",
                                f"tried {tried}; {exc.hint}"))  # fmt: skip
    if worker is None or tuning is None:
        return None, problems
    tuning_dirs = (*dirs_from_env(CONFIG_PATH_ENV, environ), *config.daemon.tuning_dirs,
                   install_tuning_dir())  # fmt: skip
    search_dirs = (*discovery.searched, *tuning_dirs)
    files = ModuleFiles(source.directory, tuning, worker, search_dirs)
    sandbox = workers.registry.create(settings.proxy).plan_sandbox(
        name, config.sandbox_settings(name), files
    )
    if sandbox is not None and sandbox.problems:
        for setting, message in sandbox.problems:
            own = getattr(settings.sandbox, setting, None) is not None
            where = f"{key}.sandbox.{setting}" if own else f"sandbox.{setting}"
            problems.append(Problem(path, where, message))
        return None, problems
    plan = ModulePlan(
        name=name, source=source, worker=worker, tuning=tuning,
        sandbox=sandbox.spec if sandbox else None,
        unavailable=sandbox.unavailable if sandbox else (),
    )  # fmt: skip
    return plan, problems
