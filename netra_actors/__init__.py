"""netra_actors: ordered, cancellable, real-time event streams for AI-agent runs, on Trio.

The public API is what this module exports; everything in underscored modules
is private and may change.
"""

from . import client as client
from . import testing as testing
from ._agents import Agent as Agent
from ._agents import demo_agent as demo_agent
from ._agents import tool_calling_agent as tool_calling_agent
from ._auth import issue_token as issue_token
from ._auth import load_secret as load_secret
from ._auth import verify_token as verify_token
from ._bridge import AgentWebSocketBridge as AgentWebSocketBridge
from ._bridge import WebSocketNotifier as WebSocketNotifier
from ._config import Config as Config
from ._conversations import ConversationStore as ConversationStore
from ._conversations import MemoryConversationStore as MemoryConversationStore
from ._exceptions import AgentError as AgentError
from ._exceptions import AuthError as AuthError
from ._exceptions import ConfigError as ConfigError
from ._exceptions import LLMError as LLMError
from ._exceptions import NetraError as NetraError
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RunNotFound as RunNotFound
from ._exceptions import RunRefused as RunRefused
from ._exceptions import RuntimeClosed as RuntimeClosed
from ._exceptions import StepLimitExceeded as StepLimitExceeded
from ._exceptions import ToolError as ToolError
from ._exceptions import TransportClosed as TransportClosed
from ._gateway import Gateway as Gateway
from ._gateway import GatewayInfo as GatewayInfo
from ._gateway import HttpRequest as HttpRequest
from ._gateway import HttpResponse as HttpResponse
from ._gateway import serve as serve
from ._llm import ChatMessage as ChatMessage
from ._llm import ChatRequest as ChatRequest
from ._llm import LLMManager as LLMManager
from ._llm import LLMProvider as LLMProvider
from ._llm import ReasoningDelta as ReasoningDelta
from ._llm import ScriptedLLMProvider as ScriptedLLMProvider
from ._llm import ScriptedTurn as ScriptedTurn
from ._llm import TextDelta as TextDelta
from ._llm import ToolCallsReady as ToolCallsReady
from ._llm import ToolSpec as ToolSpec
from ._llm import Usage as Usage
from ._manager import UnifiedWebSocketManager as UnifiedWebSocketManager
from ._messages import ErrorInfo as ErrorInfo
from ._messages import Event as Event
from ._messages import ToolCall as ToolCall
from ._messages import ToolResult as ToolResult
from ._metrics import RuntimeMetrics as RuntimeMetrics
from ._openai import CircuitBreaker as CircuitBreaker
from ._openai import OpenAIChatProvider as OpenAIChatProvider
from ._openai import RetryPolicy as RetryPolicy
from ._runtime import RunHandle as RunHandle
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._store import MemoryStore as MemoryStore
from ._store import OpenRun as OpenRun
from ._store import OpenToolCall as OpenToolCall
from ._store import RunStore as RunStore
from ._store import SqliteStore as SqliteStore
from ._store import StoredRun as StoredRun
from ._store import StoredSession as StoredSession
from ._store import StoreError as StoreError
from ._store import open_store as open_store
from ._telemetry import JsonLogFormatter as JsonLogFormatter
from ._telemetry import Telemetry as Telemetry
from ._tools import EnhancedToolExecutionEngine as EnhancedToolExecutionEngine
from ._tools import Tool as Tool
from ._tools import ToolRegistry as ToolRegistry
from ._tools import UnifiedToolExecutionEngine as UnifiedToolExecutionEngine
from ._tools import tool as tool
from ._trace import UnifiedTraceContext as UnifiedTraceContext
from ._tracker import ExecutionTracker as ExecutionTracker
from ._tracker import IllegalTransition as IllegalTransition
from ._tracker import RunSnapshot as RunSnapshot
from ._tracker import RunState as RunState
from ._transport import MemoryTransport as MemoryTransport
from ._transport import Transport as Transport
from ._transport import TrioWebSocketTransport as TrioWebSocketTransport
from ._transport import memory_transport_pair as memory_transport_pair

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentError",
    "AgentWebSocketBridge",
    "AuthError",
    "ChatMessage",
    "ChatRequest",
    "CircuitBreaker",
    "Config",
    "ConfigError",
    "ConversationStore",
    "EnhancedToolExecutionEngine",
    "ErrorInfo",
    "Event",
    "ExecutionTracker",
    "Gateway",
    "GatewayInfo",
    "HttpRequest",
    "HttpResponse",
    "IllegalTransition",
    "JsonLogFormatter",
    "LLMError",
    "LLMManager",
    "LLMProvider",
    "MemoryConversationStore",
    "MemoryStore",
    "MemoryTransport",
    "NetraError",
    "OpenAIChatProvider",
    "OpenRun",
    "OpenToolCall",
    "ProtocolError",
    "ReasoningDelta",
    "RetryPolicy",
    "RunHandle",
    "RunNotFound",
    "RunRefused",
    "RunSnapshot",
    "RunState",
    "RunStore",
    "Runtime",
    "RuntimeClosed",
    "RuntimeMetrics",
    "RuntimeStatistics",
    "ScriptedLLMProvider",
    "ScriptedTurn",
    "SqliteStore",
    "StepLimitExceeded",
    "StoreError",
    "StoredRun",
    "StoredSession",
    "Telemetry",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolCallsReady",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "ToolSpec",
    "Transport",
    "TransportClosed",
    "TrioWebSocketTransport",
    "UnifiedToolExecutionEngine",
    "UnifiedTraceContext",
    "UnifiedWebSocketManager",
    "Usage",
    "WebSocketNotifier",
    "demo_agent",
    "issue_token",
    "load_secret",
    "memory_transport_pair",
    "open_store",
    "serve",
    "tool",
    "tool_calling_agent",
    "verify_token",
]
