"""Exceptions raised by netra_actors.

Hierarchy::

    NetraError
    ├── ConfigError            bad configuration (flag, environment variable, file)
    ├── AuthError              a token is missing, malformed, badly signed or expired
    ├── ProtocolError          a client frame breaks wire protocol v1 (carries ``code``)
    ├── TransportClosed        the peer or the server closed a transport
    ├── RuntimeClosed          the runtime is shutting down or closed
    ├── RunNotFound            no queued or active run has that id
    ├── RunRefused             a thread policy or limit refused a run (carries ``code``)
    ├── AgentError             agent code failed (carries ``error_type`` for ``agent_error``)
    │   ├── LLMError           a provider failed (``llm_error``)
    │   └── StepLimitExceeded  the tool-calling loop ran out of steps (``step_limit``)
    └── ToolError              a tool failed (carries ``error_type`` for ``tool_completed``)

Errors that reach a client are turned into typed frames (``error`` frames or
failures inside ``agent_error`` / ``tool_completed`` events), never tracebacks.
"""

from __future__ import annotations


class NetraError(Exception):
    """Base class of every error netra_actors raises on purpose."""


class ConfigError(NetraError):
    """A configuration value is invalid."""


class AuthError(NetraError):
    """A token was refused. ``reason`` is a short machine word (``missing``, ``expired``...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProtocolError(NetraError):
    """A client frame is invalid. ``code`` is one of the frozen error codes of protocol v1."""

    def __init__(self, code: str, message: str, *, client_msg_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.client_msg_id = client_msg_id


class TransportClosed(NetraError):
    """The transport is closed; ``code`` is the WebSocket close code when known."""

    def __init__(self, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(f"transport closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


class RuntimeClosed(NetraError):
    """The runtime (or the session) no longer accepts work."""


class RunNotFound(NetraError):
    """No queued or active run has this id in this session."""


class RunRefused(NetraError):
    """A run was not admitted; ``code`` is ``busy`` or ``limit_exceeded``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AgentError(NetraError):
    """Agent code failed; ``error_type`` is the ``agent_error.error.type`` reported."""

    error_type = "agent_error"


class LLMError(AgentError):
    """An LLM provider failed; reported as ``llm_error``."""

    error_type = "llm_error"


class StepLimitExceeded(AgentError):
    """The tool-calling loop used all its steps without answering."""

    error_type = "step_limit"


class ToolError(NetraError):
    """A tool failed; ``error_type`` is the ``tool_completed.error.type`` reported.

    Tools may raise it (or a subclass) to choose the message shown to the user;
    any other exception from a tool is reported as ``tool_error`` too.
    ``error_type`` must be one of the protocol's ``tool_completed.error.type``
    values (docs/protocol.md); any other is reported as ``tool_error``.
    """

    def __init__(self, message: str, *, error_type: str = "tool_error") -> None:
        super().__init__(message)
        self.error_type = error_type
