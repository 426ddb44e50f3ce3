"""ipad: run IPA modules in supervised, isolated worker processes.

This module only re-exports; the work lives in small private modules. Names
are imported on first use (PEP 562) so that a worker process importing
``ipad.worker`` does not pay for trio, cattrs or structlog.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._check import CheckedConfig, ModulePlan, check_config
    from ._config import (
        Config,
        DaemonSettings,
        LogFormat,
        LogLevel,
        ModuleSettings,
        RestartMode,
        RestartOverrides,
        RestartPolicy,
    )
    from ._config_loader import load_config, parse_config
    from ._discovery import Discovery, discover_modules
    from ._duration import Duration
    from ._manifest import Manifest, ModuleSource, PipelineSupport, load_manifest
    from ._problems import ConfigError, ManifestError, Problem, ProblemsError
    from ._registry import REGISTRY, DuplicateProxyKind, ProxyKind, ProxyRegistry, register_proxy
    from ._resolve import WorkerNotFound, resolve_worker
    from ._tuning import TuningFileNotFound, find_tuning_file

#: Public name -> private module that defines it.
_EXPORTS: dict[str, str] = {
    "CheckedConfig": "_check",
    "ModulePlan": "_check",
    "check_config": "_check",
    "Config": "_config",
    "DaemonSettings": "_config",
    "LogFormat": "_config",
    "LogLevel": "_config",
    "ModuleSettings": "_config",
    "RestartMode": "_config",
    "RestartOverrides": "_config",
    "RestartPolicy": "_config",
    "load_config": "_config_loader",
    "parse_config": "_config_loader",
    "Discovery": "_discovery",
    "discover_modules": "_discovery",
    "Duration": "_duration",
    "Manifest": "_manifest",
    "ModuleSource": "_manifest",
    "PipelineSupport": "_manifest",
    "load_manifest": "_manifest",
    "ConfigError": "_problems",
    "ManifestError": "_problems",
    "Problem": "_problems",
    "ProblemsError": "_problems",
    "REGISTRY": "_registry",
    "DuplicateProxyKind": "_registry",
    "ProxyKind": "_registry",
    "ProxyRegistry": "_registry",
    "register_proxy": "_registry",
    "WorkerNotFound": "_resolve",
    "resolve_worker": "_resolve",
    "TuningFileNotFound": "_tuning",
    "find_tuning_file": "_tuning",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ipad' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ipad.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
