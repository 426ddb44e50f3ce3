"""The ``sandboxed`` proxy kind: a worker process that confines itself before loading its module.

It starts workers exactly as ``isolated`` does (so they are forked from the
fork server and restart as fast); what it adds is a SandboxSpec per module,
built from ``[sandbox]`` and the module's ``sandbox`` table
(ipad/config/sandbox_plan.py) and applied by the worker to itself before any module
code runs (ipad/worker/sandbox.py). docs/security.md is the threat model.
"""

from __future__ import annotations

from ipad.config.kind_isolated import IsolatedProcess
from ipad.config.model import SandboxSettings
from ipad.config.proxy_kinds import register_proxy
from ipad.config.sandbox_plan import ModuleFiles, SandboxPlan, plan


@register_proxy("sandboxed")
class SandboxedProcess(IsolatedProcess):
    """One confined worker process per module; see docs/security.md for what it stops."""

    def plan_sandbox(
        self, module: str, settings: SandboxSettings, files: ModuleFiles
    ) -> SandboxPlan:
        """The module's sandbox, or the settings that cannot be had here."""
        return plan(module, settings, files)
