"""The public API imports on a fresh install: every submodule, every exported name."""

from __future__ import annotations

import importlib
import pkgutil
import warnings

import pytest

import netra_actors

BACKEND_NAMES = (
    "AgentWebSocketBridge",
    "UnifiedWebSocketManager",
    "UnifiedTraceContext",
    "LLMManager",
    "UnifiedToolExecutionEngine",
    "EnhancedToolExecutionEngine",
    "WebSocketNotifier",
)


def _submodules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(netra_actors.__path__, prefix="netra_actors.")
        if not info.name.endswith("__main__")
    )


@pytest.mark.parametrize("name", _submodules())
def test_every_submodule_imports(name: str) -> None:
    """No module of the package points at a module or name that does not exist."""
    importlib.import_module(name)


def test_every_exported_name_exists() -> None:
    """Each name in ``__all__`` is importable from the package, and ``__all__`` has no duplicates."""
    assert len(set(netra_actors.__all__)) == len(netra_actors.__all__)
    for name in netra_actors.__all__:
        assert getattr(netra_actors, name) is not None, name


def test_backend_names_are_public() -> None:
    """The parts the backend names keep their names in the public API."""
    for name in BACKEND_NAMES:
        assert name in netra_actors.__all__


def test_enhanced_engine_is_an_alias() -> None:
    """``EnhancedToolExecutionEngine`` is the unified engine under its old name."""
    assert netra_actors.EnhancedToolExecutionEngine is netra_actors.UnifiedToolExecutionEngine


def test_websocket_notifier_warns() -> None:
    """The deprecated ``WebSocketNotifier`` still works as the bridge, with a DeprecationWarning."""
    assert issubclass(netra_actors.WebSocketNotifier, netra_actors.AgentWebSocketBridge)
    # The warning is given before the (missing) arguments are checked.
    with pytest.warns(DeprecationWarning, match="AgentWebSocketBridge"), pytest.raises(TypeError):
        netra_actors.WebSocketNotifier()  # type: ignore[call-arg]


def test_testing_module_has_checker() -> None:
    """The public lifecycle checker is importable where users look for it."""
    from netra_actors import testing

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(testing.check_lifecycle)
        assert issubclass(testing.LifecycleViolation, AssertionError)
