"""ipad: run IPA modules in supervised, isolated worker processes.

This module only re-exports; the work lives in the packages by process
(docs/architecture.md). Names
are imported on first use (PEP 562) so that a worker process importing
``ipad.worker`` does not pay for trio, cattrs or structlog.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ipad._version import __version__

if TYPE_CHECKING:
    from ipad.config.check import CheckedConfig, ModulePlan, check_config
    from ipad.config.discovery import Discovery, discover_modules
    from ipad.config.duration import Duration
    from ipad.config.loader import load_config, parse_config
    from ipad.config.manifest import Manifest, ModuleSource, PipelineSupport, load_manifest
    from ipad.config.model import (
        Config,
        DaemonSettings,
        LogFormat,
        LogLevel,
        ModuleSettings,
        RestartMode,
        RestartOverrides,
        RestartPolicy,
    )
    from ipad.config.problems import ConfigError, ManifestError, Problem, ProblemsError
    from ipad.config.proxy_kinds import (
        REGISTRY,
        DuplicateProxyKind,
        ProxyKind,
        ProxyRegistry,
        register_proxy,
    )
    from ipad.config.resolve import WorkerNotFound, resolve_worker
    from ipad.config.tuning import TuningFileNotFound, find_tuning_file

#: Public name -> the internal module (under ipad.) that defines it.
_EXPORTS: dict[str, str] = {
    "CheckedConfig": "config.check",
    "ModulePlan": "config.check",
    "check_config": "config.check",
    "Config": "config.model",
    "DaemonSettings": "config.model",
    "LogFormat": "config.model",
    "LogLevel": "config.model",
    "ModuleSettings": "config.model",
    "RestartMode": "config.model",
    "RestartOverrides": "config.model",
    "RestartPolicy": "config.model",
    "load_config": "config.loader",
    "parse_config": "config.loader",
    "Discovery": "config.discovery",
    "discover_modules": "config.discovery",
    "Duration": "config.duration",
    "Manifest": "config.manifest",
    "ModuleSource": "config.manifest",
    "PipelineSupport": "config.manifest",
    "load_manifest": "config.manifest",
    "ConfigError": "config.problems",
    "ManifestError": "config.problems",
    "Problem": "config.problems",
    "ProblemsError": "config.problems",
    "REGISTRY": "config.proxy_kinds",
    "DuplicateProxyKind": "config.proxy_kinds",
    "ProxyKind": "config.proxy_kinds",
    "ProxyRegistry": "config.proxy_kinds",
    "register_proxy": "config.proxy_kinds",
    "WorkerNotFound": "config.resolve",
    "resolve_worker": "config.resolve",
    "TuningFileNotFound": "config.tuning",
    "find_tuning_file": "config.tuning",
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
