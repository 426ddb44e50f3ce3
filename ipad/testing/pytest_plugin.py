"""pytest fixtures that run IPA modules under a real ipad daemon with a private socket.

Installed with ipad (entry point ``pytest11``: ``ipad``), so a module project's
tests use them without a conftest:

- ``ipad_daemon``: a factory, ``ipad_daemon(module_dirs=[...], modules={"af": {}},
  tuning_dirs=[...])`` -> a running :class:`ipad.testing.daemon.Daemon`;
- ``ipad_module``: the project's own module(s) running under a daemon, as a
  :class:`ModuleUnderTest` (``.proxy()``, ``.daemon``, ``.name``);
- ``ipad_project``: where the project's modules and tuning files are.

Every daemon is stopped with SIGTERM after the test and must stop cleanly, or
the test errors at teardown; whatever happened, nothing it started is left.
Where the project's modules are is found by itself (a directory holding a
manifest: the rootdir or one directly under it; ``tuning/`` beside them) or
set with the ini options ``ipad_module_dirs``, ``ipad_tuning_dirs`` and
``ipad_modules``; ``ipad_trusted_keys`` names the keys of signed modules.
docs/modules.md, "Testing under a real daemon", has an example.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ipad.client import BlockingProxy
    from ipad.testing.daemon import Daemon

# pytest loads this plugin in every session where ipad is installed: the daemon code
# (the client, the configuration, trio) is imported by the fixtures that use it.

__all__ = ["IpadProject", "ModuleUnderTest", "find_project"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ini options that say where a project's modules and tuning files are."""
    parser.addini(
        "ipad_module_dirs",
        type="paths",
        default=[],
        help="ipad: module directories of this project (default: the rootdir, or the "
        "directories directly under it, that hold a module manifest)",
    )
    parser.addini(
        "ipad_tuning_dirs",
        type="paths",
        default=[],
        help="ipad: tuning directories (<dir>/<module>/<file>) of this project (default: "
        "tuning/ in each module directory and in the rootdir, where it exists)",
    )
    parser.addini(
        "ipad_trusted_keys",
        type="paths",
        default=[],
        help="ipad: public keys the project's signed modules are checked against",
    )
    parser.addini(
        "ipad_modules",
        type="args",
        default=[],
        help="ipad: the modules ipad_module runs (default: every manifest in ipad_module_dirs)",
    )


@dataclass(frozen=True)
class IpadProject:
    """Where a module project's modules and tuning files are, and which modules it has."""

    module_dirs: list[Path]
    tuning_dirs: list[Path]
    modules: list[str]
    #: Public keys that signed modules are checked against (ini option ipad_trusted_keys).
    trusted_keys: list[Path] = field(default_factory=list)


def _manifests(directory: Path) -> list[str]:
    """The names of the module manifests directly in ``directory`` (``<name>.toml``)."""
    names = []
    for path in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if data.get("name") == path.stem and "api_version" in data:
            names.append(path.stem)
    return names


def find_project(
    root: Path,
    module_dirs: list[Path] | None = None,
    tuning_dirs: list[Path] | None = None,
    modules: list[str] | None = None,
    trusted_keys: list[Path] | None = None,
) -> IpadProject:
    """The project at ``root``: the given directories and modules, else what is found there."""
    if not module_dirs:
        candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
        module_dirs = [d for d in candidates if not d.name.startswith(".") and _manifests(d)]
    if not tuning_dirs:
        tuning_dirs = [d / "tuning" for d in dict.fromkeys([*module_dirs, root])
                       if (d / "tuning").is_dir()]  # fmt: skip
    if not modules:
        modules = [name for d in module_dirs for name in _manifests(d)]
    return IpadProject(
        list(module_dirs), list(tuning_dirs), list(modules), list(trusted_keys or [])
    )


@pytest.fixture(scope="session")
def ipad_project(pytestconfig: pytest.Config) -> IpadProject:
    """The module directories, tuning directories and modules of the project under test."""
    return find_project(
        pytestconfig.rootpath,
        pytestconfig.getini("ipad_module_dirs"),
        pytestconfig.getini("ipad_tuning_dirs"),
        pytestconfig.getini("ipad_modules"),
        pytestconfig.getini("ipad_trusted_keys"),
    )


@pytest.fixture
def ipad_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Start real daemons: ``ipad_daemon(module_dirs=..., modules=..., tuning_dirs=...)``.

    Takes the keywords of ``ipad.testing.daemon.run_daemon``. Each daemon is
    stopped with SIGTERM after the test; one that does not stop cleanly makes
    the test error, after everything it started is killed and reaped.
    """
    from ipad.testing.daemon import DaemonError, prepare_daemon  # noqa: PLC0415 - see above

    started: list[Daemon] = []

    def start(**options: Any) -> Daemon:
        __tracebackhide__ = True  # a start failure's message says it all
        options.setdefault("log_dir", tmp_path_factory.mktemp("ipad-daemon"))
        daemon = prepare_daemon(**options)
        daemon.start()  # cleans up after itself if it fails
        started.append(daemon)
        return daemon

    yield start
    failures = []
    for daemon in started:
        try:
            daemon.stop()
        except DaemonError as exc:
            failures.append(str(exc))
        finally:
            daemon.cleanup()
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@dataclass
class ModuleUnderTest:
    """The project's module(s) running under a daemon of their own."""

    daemon: Daemon
    modules: list[str]
    _proxies: list[BlockingProxy] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The module's name (the project must have one module, or set ``ipad_modules``)."""
        if len(self.modules) != 1:
            from ipad.testing.daemon import DaemonError  # noqa: PLC0415 - see above

            raise DaemonError(f"the project runs {len(self.modules)} modules "
                              f"({', '.join(self.modules)}): name one")  # fmt: skip
        return self.modules[0]

    def proxy(self, module: str | None = None, **options: Any) -> BlockingProxy:
        """A new proxy of the module (or of ``module``), on the daemon's shared client."""
        return self.daemon.proxy(module or self.name, **options)


@pytest.fixture
def ipad_module(ipad_daemon: Callable[..., Daemon], ipad_project: IpadProject) -> ModuleUnderTest:
    """The project's module(s) running under a real, private daemon, sandboxed."""
    __tracebackhide__ = True
    if not ipad_project.modules:
        from ipad.testing.daemon import DaemonError  # noqa: PLC0415 - see above

        raise DaemonError(f"no module manifest found in {ipad_project.module_dirs or 'the rootdir'}"
                          ": set the ini option ipad_module_dirs")  # fmt: skip
    daemon = ipad_daemon(
        module_dirs=ipad_project.module_dirs,
        modules=ipad_project.modules,
        tuning_dirs=ipad_project.tuning_dirs,
        trusted_keys=ipad_project.trusted_keys,
    )
    return ModuleUnderTest(daemon, ipad_project.modules)
