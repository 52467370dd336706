"""Limits and hostile input: the per-user rate limit (4029), the frame size limit in UTF-8
bytes (1009), redaction of secret-looking tool parameters, and a fuzzer that throws
arbitrary frames at one user's connection.

Memory transports and virtual time. The fuzzer's expectations come from an oracle
written from docs/protocol.md (the client frame table and the error codes), not from
the server's parser.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import attrs
import hypothesis
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from strategies import Frame, MemoryClient, connect, is_event, of_type

from netra_actors import (
    AgentWebSocketBridge,
    Config,
    Runtime,
    Tool,
    ToolRegistry,
    TransportClosed,
    memory_transport_pair,
)
from netra_actors._protocol import ERROR_CODES
from netra_actors.testing import check_lifecycle

#: Virtual seconds; every test here needs far less.
BOUND = 600

# --- helpers -------------------------------------------------------------------------------------


async def open_client(
    nursery: trio.Nursery,
    runtime: Runtime,
    user_id: str,
    *,
    after_seq: int | None = None,
    session_hint: str | None = None,
) -> MemoryClient:
    """A reading connection of ``user_id`` (resuming after ``after_seq`` when given)."""
    server_end, client_end = memory_transport_pair()
    client = MemoryClient(client_end, user_id)
    nursery.start_soon(
        partial(
            runtime.serve_connection,
            user_id,
            server_end,
            after_seq=after_seq,
            session_hint=session_hint,
        )
    )
    nursery.start_soon(client.read_forever)
    await client.wait_for(lambda f: True)
    return client


async def ping_burst(client: MemoryClient, count: int) -> None:
    """Send ``count`` pings at one instant (stops when the server has closed the connection)."""
    for _ in range(count):
        try:
            await client.send(type="ping")
        except TransportClosed:
            return


def merged_events(*clients: MemoryClient) -> list[Frame]:
    """The events of several (resumed) connections of one session, de-duplicated by seq."""
    by_seq: dict[int, Frame] = {}
    for client in clients:
        for frame in client.events:
            assert by_seq.setdefault(frame["seq"], frame) == frame
    return [by_seq[s] for s in sorted(by_seq)]


# --- rate limit ----------------------------------------------------------------------------------

RATE = {"rate_limit": 5.0, "rate_burst": 10}


async def test_a_burst_over_the_limit_gets_rate_limited_then_4029(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """More than rate_burst frames at once: a pong for each of the first rate_burst, error rate_limited for the next, then close 4029."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**RATE)) as runtime:
            client = await connect(nursery, runtime, "alice")
            await ping_burst(client, 15)
            await client.closed.wait()

    assert client.close_code == 4029
    assert [f["type"] for f in client.frames[1:]] == ["pong"] * 10 + ["error"]
    assert client.frames[-1]["code"] == "rate_limited"
    assert client.frames[-1]["code"] in ERROR_CODES


async def test_the_rate_budget_is_shared_by_a_users_connections(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """One bucket per user: the frame that exhausts it closes (4029) the connection that sent it; the other tab stays open and is served once the bucket refills; bob is untouched."""
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(make_config(**RATE)) as runtime:
            first = await connect(nursery, runtime, "alice")
            second = await connect(nursery, runtime, "alice")
            bob = await connect(nursery, runtime, "bob")
            await ping_burst(first, 6)
            await trio.testing.wait_all_tasks_blocked()
            await ping_burst(bob, 10)
            await ping_burst(second, 6)  # frames 7-12 of alice's burst of 10
            await second.closed.wait()
            await trio.testing.wait_all_tasks_blocked()
            first_open = not first.closed.is_set()
            await trio.sleep(1)  # 5 frames of budget come back
            await first.send(type="ping")
            await trio.testing.wait_all_tasks_blocked()
            run_id = await bob.user_message("stream 10")
            await bob.wait_terminal(run_id)
            await first.close()
            await bob.close()

    assert len(of_type(first.frames, "pong")) == 7
    assert not of_type(first.frames, "error")
    assert first_open
    assert first.close_code == 1000  # closed by the test, not by the server
    # alice's 11th frame in the burst (second's 5th) is the one over the budget of 10.
    assert second.close_code == 4029
    assert [f["type"] for f in second.frames[1:]] == ["pong"] * 4 + ["error"]
    assert second.frames[-1]["code"] == "rate_limited"
    assert len(of_type(bob.frames, "pong")) == 10
    assert not of_type(bob.frames, "error")
    check_lifecycle(bob.frames)


@st.composite
def paced_senders(draw: st.DrawFn) -> tuple[int, list[float]]:
    """An initial burst within rate_burst, then gaps each a bit longer than 1/rate_limit."""
    burst = draw(st.integers(min_value=0, max_value=int(RATE["rate_burst"])))
    period = 1 / RATE["rate_limit"]
    gaps = draw(st.lists(st.floats(min_value=1.01 * period, max_value=3 * period), max_size=60))
    return burst, gaps


async def _below_the_rate(burst: int, gaps: list[float]) -> None:
    config = Config(store="memory", shutdown_grace=2.0, **RATE)  # type: ignore[arg-type]
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            client = await connect(nursery, runtime, "alice")
            await ping_burst(client, burst)
            for gap in gaps:
                await trio.sleep(gap)
                await client.send(type="ping")
            await trio.testing.wait_all_tasks_blocked()
            assert not client.closed.is_set()
            await client.close()
    assert [f["type"] for f in client.frames[1:]] == ["pong"] * (burst + len(gaps))


@given(plan=paced_senders())
def test_a_client_below_the_rate_is_never_limited(plan: tuple[int, list[float]]) -> None:
    """A burst within rate_burst, then frames slower than rate_limit (virtual time): never limited, every ping answered."""
    trio.run(_below_the_rate, *plan, clock=trio.testing.MockClock(autojump_threshold=0))


# --- frame size ----------------------------------------------------------------------------------

LIMIT = 64
PREFIX, SUFFIX = '{"type":"ping","p":"', '"}'


def ping_of_bytes(size: int, char: str) -> str:
    """A valid ping frame of exactly ``size`` UTF-8 bytes, padded mostly with ``char``."""
    room = size - len(PREFIX) - len(SUFFIX)
    width = len(char.encode())
    frame = PREFIX + char * (room // width) + "a" * (room % width) + SUFFIX
    assert len(frame.encode()) == size
    return frame


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
async def test_a_frame_of_exactly_max_frame_bytes_is_accepted(
    char: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A text frame of exactly max_frame_bytes UTF-8 bytes (multibyte characters) is accepted."""
    with trio.fail_after(BOUND):
        async with (
            trio.open_nursery() as nursery,
            Runtime(make_config(max_frame_bytes=LIMIT)) as runtime,
        ):
            client = await connect(nursery, runtime, "alice")
            await client.send_raw(ping_of_bytes(LIMIT, char))
            await client.wait_for(lambda f: f["type"] == "pong")
            await trio.testing.wait_all_tasks_blocked()
            assert not client.closed.is_set()
            await client.close()


@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
async def test_a_frame_one_byte_over_max_frame_bytes_closes_1009(
    char: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A text frame of max_frame_bytes + 1 UTF-8 bytes closes the connection 1009, without a reply; the session lives on."""
    with trio.fail_after(BOUND):
        async with (
            trio.open_nursery() as nursery,
            Runtime(make_config(max_frame_bytes=LIMIT)) as runtime,
        ):
            client = await connect(nursery, runtime, "alice")
            await client.send_raw(ping_of_bytes(LIMIT + 1, char))
            await client.closed.wait()
            again = await connect(nursery, runtime, "alice")
            await again.send(type="ping")
            await again.wait_for(lambda f: f["type"] == "pong")
            await again.close()

    assert client.close_code == 1009
    assert [f["type"] for f in client.frames] == ["session_ready"]
    assert again.session_ready["session_id"] == client.session_ready["session_id"]


async def test_the_size_limit_counts_utf8_bytes_not_characters(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A frame of fewer characters than max_frame_bytes but more UTF-8 bytes closes 1009."""
    frame = PREFIX + "é" * 40 + SUFFIX
    assert len(frame) <= LIMIT < len(frame.encode())
    with trio.fail_after(BOUND):
        async with (
            trio.open_nursery() as nursery,
            Runtime(make_config(max_frame_bytes=LIMIT)) as runtime,
        ):
            client = await connect(nursery, runtime, "alice")
            await client.send_raw(frame)
            await client.closed.wait()
    assert client.close_code == 1009


async def test_a_binary_frame_over_max_frame_bytes_closes_1009(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A binary frame larger than max_frame_bytes closes 1009 on the memory transport too."""
    with trio.fail_after(BOUND):
        async with (
            trio.open_nursery() as nursery,
            Runtime(make_config(max_frame_bytes=LIMIT)) as runtime,
        ):
            client = await connect(nursery, runtime, "alice")
            await client.send_raw(b"x" * (LIMIT + 1))
            await trio.testing.wait_all_tasks_blocked()
            closed = client.closed.is_set()
            await client.close()
    assert closed
    assert client.close_code == 1009


# --- redaction -----------------------------------------------------------------------------------

BRIEF_ARGUMENTS = {"password": "p", "nested": {"api_key": "k", "ok": 1}, "list": [{"token": "t"}]}
BRIEF_SHOWN = {
    "password": "[redacted]",
    "nested": {"api_key": "[redacted]", "ok": 1},
    "list": [{"token": "[redacted]"}],
}
#: Keys the docs call secret-looking (any case, any depth), with values that occur nowhere else.
SECRET_KEYS = [
    "password",
    "passwd",
    "passphrase",
    "secret",
    "client_secret",
    "token",
    "X-Auth-Token",
    "api_key",
    "api-key",
    "APIKEY",
    "Authorization",
    "auth",
    "credential",
    "credentials",
    "private_key",
    "private-key",
    "cookie",
    "session_key",
]


def secret_runtime(config: Config, arguments: Mapping[str, Any], received: list[Any]) -> Runtime:
    """An agent that calls the tool ``vault`` with ``arguments``; the tool records what it got."""

    async def vault(**kwargs: Any) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        received.append(copy.deepcopy(kwargs))
        return {"stored": sorted(kwargs)}

    # Any keyword is accepted: some secret keys ("api-key") are not Python identifiers.
    registry = ToolRegistry()
    registry.add(Tool(name="vault", description="Keep secrets.", function=vault))

    async def agent(bridge: AgentWebSocketBridge) -> str:
        result = await bridge.execute_tool("vault", arguments)
        assert result.ok, result
        return "stored"

    return Runtime(config, agents={"keeper": agent}, tools=registry)


async def _tool_executing(
    config: Config, arguments: Mapping[str, Any]
) -> tuple[Frame, list[Any], list[Frame]]:
    received: list[Any] = []
    with trio.fail_after(BOUND):
        async with (
            trio.open_nursery() as nursery,
            secret_runtime(config, arguments, received) as runtime,
        ):
            client = await connect(nursery, runtime, "alice")
            run_id = await client.user_message("keep these")
            await client.wait_terminal(run_id)
            await client.close()
    report = check_lifecycle(client.frames)
    assert report.runs[run_id].terminal == "agent_completed"
    (executing,) = of_type(client.events, "tool_executing")
    return dict(executing), received, client.frames


async def test_secret_tool_parameters_are_redacted_in_tool_executing(
    make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """Secret-looking keys at any depth show "[redacted]" in tool_executing, other values show as they are; the tool gets the real values."""
    arguments = copy.deepcopy(BRIEF_ARGUMENTS)
    executing, received, _ = await _tool_executing(make_config(), arguments)
    assert executing["data"]["parameters"] == BRIEF_SHOWN
    assert received == [BRIEF_ARGUMENTS]
    assert arguments == BRIEF_ARGUMENTS  # the caller's arguments are not modified


@pytest.mark.parametrize("key", SECRET_KEYS)
async def test_every_documented_secret_key_is_redacted_everywhere_on_the_wire(
    key: str, make_config: Callable[..., Config], autojump_clock: trio.testing.MockClock
) -> None:
    """A secret-looking key (any spelling the docs list, at the top, nested, in a list) never puts its value on the wire."""
    value = f"SECRET-{abs(hash(key)):x}"
    arguments = {
        key: value,
        "outer": {key: value + "-nested", "visible": "shown-1"},
        "items": [{key: value + "-listed"}, "shown-2"],
    }
    executing, received, frames = await _tool_executing(make_config(), arguments)
    assert executing["data"]["parameters"] == {
        key: "[redacted]",
        "outer": {key: "[redacted]", "visible": "shown-1"},
        "items": [{key: "[redacted]"}, "shown-2"],
    }
    assert received == [arguments]
    wire = json.dumps(frames)
    assert value not in wire
    assert "shown-1" in wire
    assert "shown-2" in wire


# --- fuzz ----------------------------------------------------------------------------------------

FUZZ_LIMIT = 16_384
MAX_ID = 128
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

FIELDS = (
    "text",
    "thread_id",
    "client_msg_id",
    "traceparent",
    "policy",
    "run_id",
    "after_seq",
    "session_id",
)
field_values = st.one_of(
    json_values,
    st.text(max_size=140),
    st.text(min_size=MAX_ID - 2, max_size=MAX_ID + 2),
    st.integers(min_value=-3, max_value=10**6),
    st.sampled_from(["enqueue", "reject", "interrupt", "ENQUEUE", "", "main"]),
)
frame_types = st.one_of(
    st.sampled_from(
        ["user_message", "cancel", "resume", "ping", "pong", "", "PING", "user_message ", "error"]
    ),
    json_values,
)


identifiers = st.text(min_size=1, max_size=MAX_ID)
#: Valid values of each field, by frame type (docs/protocol.md, client frames).
VALID_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "user_message": {
        "text": st.text(max_size=30),
        "thread_id": identifiers,
        "client_msg_id": identifiers,
        "policy": st.sampled_from(["enqueue", "reject", "interrupt"]),
        "traceparent": st.sampled_from(
            ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "not a traceparent"]
        ),
    },
    "cancel": {"run_id": identifiers, "client_msg_id": identifiers},
    "resume": {
        "after_seq": st.integers(min_value=0, max_value=2**63 - 1),
        "session_id": identifiers,
        "client_msg_id": identifiers,
    },
    "ping": {},
}
REQUIRED = {"user_message": "text", "cancel": "run_id", "resume": "after_seq"}


@st.composite
def near_valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    """A valid frame of a known type, then maybe a few fields broken, dropped, nulled or added."""
    kind = draw(st.sampled_from(sorted(VALID_FIELDS)))
    fields = VALID_FIELDS[kind]
    frame: dict[str, Any] = {"type": kind}
    for name, values in fields.items():
        if name == REQUIRED.get(kind) or draw(st.booleans()):
            frame[name] = draw(values)
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        name = draw(st.sampled_from(["type", *FIELDS]))
        action = draw(st.sampled_from(["break", "drop", "null"]))
        if action == "break":
            frame[name] = draw(field_values if name != "type" else frame_types)
        elif action == "drop":
            frame.pop(name, None)
        else:
            frame[name] = None
    return frame


@attrs.frozen
class Probe:
    """One client message, and the outcomes the protocol allows for it."""

    message: str | bytes
    allowed: frozenset[str]
    #: The frame's client_msg_id when an error must echo it (a valid one).
    echo: str | None = None
    label: str = ""
    #: The frame's client_msg_id when it is a string at all (an error may echo it).
    raw_id: str | None = None


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= MAX_ID


def _optional_id(obj: Mapping[str, Any], key: str) -> bool:
    return obj.get(key) is None or _valid_id(obj[key])


def _walk(value: Any) -> list[Any]:
    """Every value inside ``value`` (keys included), without recursion."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        found.append(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def expect_object(obj: Any) -> frozenset[str]:
    """What docs/protocol.md says the server does with the decoded frame ``obj``."""
    if not isinstance(obj, dict):
        return frozenset({"error:bad_frame"})
    kind = obj.get("type")
    if not isinstance(kind, str):
        return frozenset({"error:bad_frame"})
    if kind == "ping":
        return frozenset({"pong"})
    if kind == "user_message":
        policy = obj.get("policy")
        valid = (
            isinstance(obj.get("text"), str)
            and _optional_id(obj, "thread_id")
            and _optional_id(obj, "client_msg_id")
            and (obj.get("traceparent") is None or isinstance(obj["traceparent"], str))
            and policy in (None, "enqueue", "reject", "interrupt")
        )
        if valid:
            return frozenset({"accepted", "error:busy", "error:limit_exceeded"})
        return frozenset({"error:bad_frame"})
    if kind == "cancel":
        return frozenset({"error:not_found" if _valid_id(obj.get("run_id")) else "error:bad_frame"})
    if kind == "resume":
        after = obj.get("after_seq")
        valid = (
            isinstance(after, int)
            and not isinstance(after, bool)
            and after >= 0
            and _optional_id(obj, "session_id")
        )
        return frozenset({"none", "resume_gap"} if valid else {"error:bad_frame"})
    return frozenset({"error:unknown_type"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def probe_for_text(text: str, label: str) -> Probe:
    """The oracle for a text frame: size first, then UTF-8, then JSON, then the frame table."""
    if len(text.encode("utf-8", "surrogatepass")) > FUZZ_LIMIT:
        return Probe(text, frozenset({"close:1009"}), label=label)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Probe(text, frozenset({"error:bad_json"}), label=label)
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return Probe(text, frozenset({"error:bad_json"}), label=label)
    allowed = set(expect_object(obj))
    leaves = _walk(obj)
    # Valid JSON the server's decoder may still refuse: numbers beyond a double, strings
    # with an escaped lone surrogate (not Unicode text).
    if any(isinstance(x, float) and math.isinf(x) for x in leaves) or any(
        isinstance(x, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in x) for x in leaves
    ):
        allowed.add("error:bad_json")
    raw_id = obj.get("client_msg_id") if isinstance(obj, dict) else None
    raw_id = raw_id if isinstance(raw_id, str) else None
    echo = raw_id if _valid_id(raw_id) else None
    return Probe(text, frozenset(allowed), echo=echo, label=label, raw_id=raw_id)


def _dumps(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def huge_frames(draw: st.DrawFn) -> Probe:
    """Pings padded to straddle the size limit, with multibyte padding."""
    char = draw(st.sampled_from(["a", "é", "€", "😀"]))
    size = draw(st.integers(min_value=FUZZ_LIMIT - 8, max_value=FUZZ_LIMIT + 8))
    room = size - len(PREFIX) - len(SUFFIX)
    width = len(char.encode())
    text = PREFIX + char * (room // width) + "a" * (room % width) + SUFFIX
    return probe_for_text(text, "huge")


#: How deep the server's JSON decoder nests (orjson); deeper, valid JSON is refused as bad_json.
DECODER_DEPTH = 1024


@st.composite
def deep_frames(draw: st.DrawFn) -> Probe:
    """Deeply nested arrays or objects, alone or inside a ping."""
    depth = draw(st.integers(min_value=1, max_value=300) | st.integers(1025, 2500))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = opening * depth + ("1" if opening != "[" else "") + closing * depth
    wrapped = draw(st.booleans())
    text = '{"type":"ping","x":' + inner + "}" if wrapped else inner
    if depth <= 300 or len(text) > FUZZ_LIMIT:
        return probe_for_text(text, "deep")
    # Valid JSON: a ping, or a frame that is not a typed object; or too deep to decode.
    served = "pong" if wrapped else "error:bad_frame"
    assert depth > DECODER_DEPTH
    return Probe(text, frozenset({served, "error:bad_json"}), label="too deep")


surrogate_frames = st.sampled_from(
    [
        '{"type":"ping","x":"\ud800"}',
        '{"type":"user_message","text":"\udfff"}',
        "\udc80",
        '{"type":"ping","x":"\\ud800"}',
        '{"type":"user_message","text":"\\udc00 lone"}',
    ]
).map(lambda text: probe_for_text(text, "surrogate"))


def _binary_probe(data: bytes) -> Probe:
    if len(data) > FUZZ_LIMIT:
        return Probe(data, frozenset({"close:1009"}), label="binary")
    return Probe(data, frozenset({"error:bad_frame"}), label="binary")


binary_frames = st.one_of(
    st.binary(max_size=200),
    st.integers(min_value=FUZZ_LIMIT - 4, max_value=FUZZ_LIMIT + 4).map(lambda n: b"\xff" * n),
).map(_binary_probe)

near_valid_probes = st.builds(_dumps, near_valid_frames(), st.booleans()).map(
    lambda t: probe_for_text(t, "near-valid")
)
probes = st.one_of(
    st.text(max_size=200).map(lambda t: probe_for_text(t, "text")),
    st.builds(_dumps, json_values, st.booleans()).map(lambda t: probe_for_text(t, "json")),
    near_valid_probes,
    near_valid_probes,  # twice: they reach the most server code
    huge_frames(),
    deep_frames(),
    surrogate_frames,
    binary_frames,
)


def outcome(replies: list[Frame], closed_code: int | None) -> str:
    """What the server did with one frame: its only reply, nothing, or the close."""
    if closed_code is not None:
        assert not replies, replies
        return f"close:{closed_code}"
    assert len(replies) <= 1, replies
    if not replies:
        return "none"
    reply = replies[0]
    kind = reply["type"]
    if kind == "error":
        assert reply["code"] in ERROR_CODES, reply
        return f"error:{reply['code']}"
    return {"run_accepted": "accepted"}.get(kind, kind)


async def _fuzz(batch: list[Probe]) -> None:
    config = Config(store="memory", shutdown_grace=2.0, max_frame_bytes=FUZZ_LIMIT)
    connections: list[MemoryClient] = []
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery, Runtime(config) as runtime:
            bob = await open_client(nursery, runtime, "bob")
            bob_run = await bob.user_message("stream 50")
            client = await open_client(nursery, runtime, "alice")
            connections.append(client)
            session_id = client.session_ready["session_id"]
            for probe in batch:
                mark = len(client.frames)
                await client.send_raw(probe.message)
                await trio.testing.wait_all_tasks_blocked()
                replies = [f for f in client.frames[mark:] if not is_event(f)]
                code = client.close_code if client.closed.is_set() else None
                got = outcome(replies, code)
                assert got in probe.allowed, (probe, got, replies)
                hypothesis.event(f"{probe.label}: {got}")
                for reply in of_type(replies, "error"):
                    # A valid client_msg_id is echoed; nothing but the frame's own is.
                    if probe.echo is not None:
                        assert reply.get("client_msg_id") == probe.echo, (probe, reply)
                    if "client_msg_id" in reply:
                        assert reply["client_msg_id"] == probe.raw_id, (probe, reply)
                if code is not None:
                    # The session survives: resume it on a new connection.
                    last = max((f["seq"] for c in connections for f in c.events), default=0)
                    client = await open_client(
                        nursery, runtime, "alice", after_seq=last, session_hint=session_id
                    )
                    connections.append(client)
            await client.close()
            final = await open_client(
                nursery,
                runtime,
                "alice",
                after_seq=max((f["seq"] for c in connections for f in c.events), default=0),
                session_hint=session_id,
            )
            connections.append(final)
            run_id = await final.user_message("what is 2+3*4?")
            await final.wait_terminal(run_id)
            await bob.wait_terminal(bob_run)
            await trio.testing.wait_all_tasks_blocked()
            stats = runtime.statistics()
            await final.close()
            await bob.close()

    assert stats.sessions == 2
    assert (stats.active_runs, stats.queued_runs) == (0, 0)
    for connection in connections:
        assert connection.session_ready["session_id"] == session_id
    # Every reconnection resumed where the last one stopped: together, gap-free from 1.
    report = check_lifecycle([connections[0].session_ready, *merged_events(*connections)])
    assert report.runs[run_id].terminal == "agent_completed"
    assert "14" in final.events[-1]["data"]["final_response"]
    bob_report = check_lifecycle(bob.frames)
    assert bob_report.runs.keys() == {bob_run}
    assert bob_report.runs[bob_run].terminal == "agent_completed"
    assert not bob.replies("error")


@given(batch=st.lists(probes, min_size=1, max_size=6))
def test_arbitrary_frames_get_typed_errors_and_hurt_nobody(batch: list[Probe]) -> None:
    """Arbitrary frames: each gets the reply the protocol table allows (typed error, pong, run_accepted, resume) or close 1009; the session and bob's run carry on lawfully."""
    trio.run(_fuzz, batch, clock=trio.testing.MockClock(autojump_threshold=0))
