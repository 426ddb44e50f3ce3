"""The registry of proxy kinds: isolation strategies that run an IPA module.

After libcamera's ``IPAProxyFactory`` and ``REGISTER_IPA_PROXY``: ipad's own
kinds register with a class decorator when their module is imported, and
third-party kinds through the ``ipad.proxies`` entry-point group. Unlike the
seed, a name registered twice is an error rather than a silent second entry.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import structlog

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from ipad.config.model import SandboxSettings
    from ipad.config.sandbox_plan import ModuleFiles, SandboxPlan

log = structlog.get_logger("ipad")

#: The entry-point group third-party packages use to add proxy kinds.
ENTRY_POINT_GROUP = "ipad.proxies"

#: ipad's own kinds, imported on first lookup so that merely importing ipad
#: registers (and logs) nothing before logging is configured.
BUILTIN_KIND_MODULES = ("ipad.config.kind_isolated", "ipad.config.kind_sandboxed")


class ProxyKind(abc.ABC):
    """How a module's worker is isolated; subclasses are registered by name."""

    #: Set by ``register``: the name a module's ``proxy`` key uses.
    name: ClassVar[str]

    @abc.abstractmethod
    def worker_argv(self, executable: Path) -> list[str]:
        """The command line that starts a worker from its resolved executable."""

    def problems(self, executable: Path) -> list[str]:
        """Why this kind cannot start that worker here; checked by ``--check-config``."""
        return []

    def plan_sandbox(
        self, module: str, settings: SandboxSettings, files: ModuleFiles
    ) -> SandboxPlan | None:
        """The sandbox the module's workers confine themselves in; None: no sandbox."""
        return None


class DuplicateProxyKind(ValueError):
    """A proxy kind name was registered twice."""


K = TypeVar("K", bound=type[ProxyKind])


class ProxyRegistry:
    """Proxy kinds by name; entry points are loaded once, on first lookup."""

    def __init__(self, group: str = ENTRY_POINT_GROUP, builtins: tuple[str, ...] = ()) -> None:
        self._kinds: dict[str, type[ProxyKind]] = {}
        self._group = group
        self._builtins = builtins
        self._loaded = False

    def register(self, name: str) -> Callable[[K], K]:
        """Class decorator registering a ProxyKind subclass under ``name``."""

        def decorate(cls: K) -> K:
            self.add(name, cls)
            return cls

        return decorate

    def add(self, name: str, cls: type[ProxyKind]) -> None:
        """Register ``cls`` as ``name``; raise DuplicateProxyKind if the name is taken."""
        if not (isinstance(cls, type) and issubclass(cls, ProxyKind)):
            raise TypeError(f"proxy kind {name!r}: {cls!r} is not a ProxyKind subclass")
        existing = self._kinds.get(name)
        if existing is not None:
            raise DuplicateProxyKind(
                f"proxy kind {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; "
                f"{cls.__module__}.{cls.__qualname__} cannot take it too"
            )
        cls.name = name
        self._kinds[name] = cls
        log.debug("proxy.registered", proxy=name, cls=f"{cls.__module__}.{cls.__qualname__}")

    def kinds(self) -> Mapping[str, type[ProxyKind]]:
        """Every registered kind, third-party ones included."""
        self._load_entry_points()
        return dict(self._kinds)

    def names(self) -> Collection[str]:
        """The registered kinds' names, for checking a configuration against.

        Asking whether a built-in kind is among them looks no further: reading
        the installed packages' entry points (and importing importlib.metadata)
        costs some 20 ms of the daemon's start, paid only when a configuration
        names a kind ipad does not ship, or when the names are listed.
        """
        return _KindNames(self)

    def lookup(self, name: str) -> type[ProxyKind] | None:
        """The kind registered as ``name``; third-party kinds are loaded only if needed."""
        self._load_builtins()
        if name not in self._kinds:
            self._load_entry_points()
        return self._kinds.get(name)

    def create(self, name: str) -> ProxyKind:
        """Instantiate the kind registered as ``name`` (the seed's ``create``)."""
        cls = self.lookup(name)
        if cls is None:
            known = ", ".join(sorted(self.kinds())) or "none"
            raise LookupError(f"unknown proxy kind {name!r}; registered: {known}")
        return cls()

    def _load_builtins(self) -> None:
        for module in self._builtins:
            importlib.import_module(module)

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        self._load_builtins()
        for entry in _entry_points(self._group):
            try:
                cls = entry.load()
            except Exception:  # a broken plugin must not stop the daemon
                log.exception("proxy.entry_point_failed", proxy=entry.name, target=entry.value)
                continue
            if self._kinds.get(entry.name) is cls:
                continue  # it registered itself with the decorator when imported
            error = self._try_add(entry.name, cls)
            if error is not None:
                log.error(
                    "proxy.entry_point_rejected", proxy=entry.name, target=entry.value, error=error
                )

    def _try_add(self, name: str, cls: type[ProxyKind]) -> str | None:
        try:
            self.add(name, cls)
        except (DuplicateProxyKind, TypeError) as exc:
            return str(exc)
        return None


class _KindNames(Collection[str]):
    """The names of a registry's kinds; ``in`` loads third-party kinds only on a miss."""

    def __init__(self, registry: ProxyRegistry) -> None:
        self._registry = registry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._registry.lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.kinds())

    def __len__(self) -> int:
        return len(self._registry.kinds())


def _entry_points(group: str) -> Iterator[EntryPoint]:
    from importlib.metadata import entry_points  # noqa: PLC0415 - ~20 ms: only if needed

    yield from entry_points(group=group)


#: The daemon's registry; ``register_proxy`` is the seed's REGISTER_IPA_PROXY.
REGISTRY = ProxyRegistry(builtins=BUILTIN_KIND_MODULES)
register_proxy = REGISTRY.register
