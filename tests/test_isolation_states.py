"""A proxy-isolated module's state follows its spare worker's, without I/O."""

from __future__ import annotations

import pytest

from ipad.daemon.isolation import module_state
from ipad.daemon.states import WorkerState as S


@pytest.mark.parametrize("module", list(S))
@pytest.mark.parametrize("spare", [S.RUNNING, S.BACKOFF, S.COOLDOWN, S.FAILED])
def test_a_spare_that_settles_sets_the_module_state(module: S, spare: S) -> None:
    """Loaded, or unable to start (backoff, cooldown, failed): the module says the same."""
    assert module_state(module, spare) is spare


@pytest.mark.parametrize("spare", [S.STARTING, S.EXITED])
def test_a_spare_replaced_while_running_leaves_the_module_running(spare: S) -> None:
    """The next spare starting after a grant (or one restarting) is not news to clients."""
    assert module_state(S.RUNNING, spare) is None


@pytest.mark.parametrize("module", [S.STARTING, S.BACKOFF, S.COOLDOWN, S.EXITED, S.STOPPED])
def test_before_running_the_module_shows_its_spare_starting(module: S) -> None:
    """Not running yet (first start, or out of backoff): the spare's start is the module's."""
    assert module_state(module, S.STARTING) is S.STARTING
    assert module_state(module, S.EXITED) is S.EXITED
