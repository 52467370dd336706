// netra-actors web page: a protocol v1 client (docs/protocol.md) in plain JavaScript.
// Sends messages, streams answers, shows a timeline of every event of each run,
// cancels runs, and reconnects with backoff, resuming after the last seq it has.
"use strict";

(() => {
  const TOKEN_KEY = "netra-actors.token";
  const SESSION_KEY = "netra-actors.session_id";
  const BATCH = 100; // multi-event frames: a replay arrives in few frames
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const TERMINAL = {
    agent_completed: "completed",
    agent_error: "failed",
    agent_cancelled: "cancelled",
  };
  const COALESCED = new Set(["agent_thinking", "partial_result"]);

  const byId = (id) => document.getElementById(id);
  const ui = {
    connection: byId("connection"),
    signOut: byId("sign-out"),
    signIn: byId("sign-in"),
    tokenForm: byId("token-form"),
    tokenInput: byId("token"),
    signInError: byId("sign-in-error"),
    chat: byId("chat"),
    notice: byId("notice"),
    runs: byId("runs"),
    messageForm: byId("message-form"),
    message: byId("message"),
    send: byId("send"),
  };

  const state = {
    token: null,
    ws: null,
    sessionId: null,
    lastSeq: 0, // seq of the last event applied (events at or below it are duplicates)
    hasStream: false, // events of a stream were applied on this page
    connectedOnce: false, // a session_ready arrived with this token
    attempt: 0,
    retryTimer: null,
    runs: new Map(), // run_id -> run
    pending: new Map(), // client_msg_id -> run sent but not yet accepted
    sent: 0,
    cards: 0,
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clip(text, max) {
    return text.length > max ? `${text.slice(0, max)}…` : text;
  }

  function json(value, max = 400) {
    let text;
    try {
      text = JSON.stringify(value);
    } catch {
      text = String(value);
    }
    return clip(text === undefined ? "" : text, max);
  }

  function formatMs(ms) {
    if (typeof ms !== "number") return "";
    return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
  }

  function keepScrolled(wasNearBottom) {
    if (wasNearBottom) window.scrollTo(0, document.body.scrollHeight);
  }

  // --- connection state ---------------------------------------------------------------------

  function setConnection(kind, text) {
    ui.connection.dataset.state = kind;
    ui.connection.textContent = text;
    const open = kind === "connected";
    ui.send.disabled = !open;
    for (const run of state.runs.values()) {
      if (run.cancelButton) run.cancelButton.disabled = !open || run.cancelling;
    }
  }

  function showNotice(text) {
    ui.notice.textContent = text;
  }

  function wsUrl() {
    const params = new URLSearchParams({ token: state.token, batch: String(BATCH) });
    params.set("after_seq", String(state.lastSeq));
    if (state.sessionId) params.set("session_id", state.sessionId);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws?${params}`;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    if (!state.token) return;
    setConnection(
      state.connectedOnce ? "reconnecting" : "connecting",
      state.connectedOnce ? "Reconnecting…" : "Connecting…",
    );
    let ws;
    try {
      ws = new WebSocket(wsUrl(), ["netra.v1"]);
    } catch (err) {
      askForToken(`Cannot connect: ${err.message}`);
      return;
    }
    state.ws = ws;
    let ready = false;
    ws.onmessage = (message) => {
      if (state.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        showNotice("The server sent a frame that is not JSON; it was ignored.");
        return;
      }
      if (frame && frame.type === "session_ready") ready = true;
      handleFrame(frame);
    };
    ws.onclose = (event) => {
      if (state.ws !== ws) return;
      state.ws = null;
      for (const run of state.pending.values()) setStatus(run, "unconfirmed");
      if (!ready && !state.connectedOnce) {
        askForToken(
          "Could not connect with this token: it may be invalid or expired, " +
            "or the server is unreachable.",
        );
        return;
      }
      scheduleReconnect(event.code);
    };
  }

  function scheduleReconnect(code) {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempt);
    const delay = Math.round(base * (0.5 + Math.random() / 2));
    state.attempt += 1;
    const why = code ? ` (closed with ${code})` : "";
    setConnection(
      "reconnecting",
      `Reconnecting in ${(delay / 1000).toFixed(1)} s${why}, attempt ${state.attempt}…`,
    );
    state.retryTimer = setTimeout(connect, delay);
  }

  function disconnect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close(1000, "bye");
  }

  // --- frames -------------------------------------------------------------------------------

  function handleFrame(frame) {
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "session_ready":
        onSessionReady(frame);
        break;
      case "resume_gap":
        onResumeGap(frame);
        break;
      case "run_accepted":
        onRunAccepted(frame);
        break;
      case "error":
        onError(frame);
        break;
      case "events":
        if (Array.isArray(frame.events)) frame.events.forEach(onEvent);
        break;
      case "pong":
        break;
      default:
        if (typeof frame.seq === "number") onEvent(frame);
    }
  }

  function onSessionReady(frame) {
    state.attempt = 0;
    state.connectedOnce = true;
    const startsAfter = typeof frame.after_seq === "number" ? frame.after_seq : frame.last_seq;
    if (frame.session_id !== state.sessionId) {
      // A different stream (a new session): its seq numbers start over.
      if (state.hasStream) {
        showNotice("The server started a new session; runs above are from the previous one.");
        for (const run of state.runs.values()) {
          if (!run.done) finish(run, "unknown");
        }
      }
      state.sessionId = frame.session_id;
      sessionStorage.setItem(SESSION_KEY, frame.session_id);
      state.lastSeq = startsAfter;
    }
    setConnection("connected", `Connected as ${frame.user_id}`);
  }

  function onResumeGap(frame) {
    if (frame.session_id !== state.sessionId) {
      state.sessionId = frame.session_id;
      sessionStorage.setItem(SESSION_KEY, frame.session_id);
      state.lastSeq = frame.oldest_seq - 1;
    } else if (state.lastSeq > frame.last_seq) {
      state.lastSeq = frame.oldest_seq - 1; // our seq is not in this stream
    } else if (state.lastSeq < frame.oldest_seq - 1 && state.hasStream) {
      showNotice(
        `Events ${state.lastSeq + 1} to ${frame.oldest_seq - 1} are no longer kept ` +
          "by the server; the timeline continues after them.",
      );
    }
  }

  function onRunAccepted(frame) {
    let run = state.pending.get(frame.client_msg_id);
    if (run) {
      state.pending.delete(frame.client_msg_id);
      const known = state.runs.get(frame.run_id);
      if (known) {
        run.item.remove(); // its events already made a card
        return;
      }
      attach(run, frame.run_id);
      if (run.status === "sending" || run.status === "unconfirmed") setStatus(run, "queued");
    } else if (!state.runs.has(frame.run_id)) {
      run = newRun(null);
      attach(run, frame.run_id);
      setStatus(run, "queued");
    }
  }

  function onError(frame) {
    const run = state.pending.get(frame.client_msg_id);
    const text = `${frame.code}: ${frame.message}`;
    if (run) {
      state.pending.delete(frame.client_msg_id);
      setStatus(run, "refused");
      run.answer.textContent = text;
      run.answer.classList.add("error");
      return;
    }
    showNotice(`The server answered ${text}`);
  }

  function onEvent(event) {
    if (!event || typeof event.seq !== "number" || typeof event.run_id !== "string") return;
    if (event.seq <= state.lastSeq) return; // already shown (a resume sends events again)
    state.lastSeq = event.seq;
    state.hasStream = true;
    const data = event.data && typeof event.data === "object" ? event.data : {};
    const wasNearBottom = nearBottom();
    const run = runFor(event, data);
    if (run.firstTs === null && typeof event.ts === "number") run.firstTs = event.ts;
    addToTimeline(run, event, data);
    applyToRun(run, event, data);
    keepScrolled(wasNearBottom);
  }

  function runFor(event, data) {
    let run = state.runs.get(event.run_id);
    if (run) return run;
    const msgId = data.client_msg_id;
    if (typeof msgId === "string" && state.pending.has(msgId)) {
      run = state.pending.get(msgId);
      state.pending.delete(msgId);
    } else {
      run = newRun(event.type === "agent_started" ? data.text : null);
    }
    attach(run, event.run_id);
    return run;
  }

  function applyToRun(run, event, data) {
    switch (event.type) {
      case "agent_started":
        if (typeof data.text === "string") run.question.textContent = data.text;
        setStatus(run, "running");
        break;
      case "partial_result":
        if (typeof data.text === "string") {
          run.answerText += data.text;
          run.answer.textContent = run.answerText;
        }
        break;
      case "agent_completed":
        if (typeof data.final_response === "string" && data.final_response !== run.answerText) {
          run.answerText = data.final_response;
          run.answer.textContent = data.final_response;
        }
        finish(run, "completed");
        break;
      case "agent_error": {
        const error = data.error || {};
        run.answer.classList.add("error");
        run.answer.textContent = `${run.answerText}${run.answerText ? "\n" : ""}Error (${error.type}): ${error.message}`;
        finish(run, "failed");
        break;
      }
      case "agent_cancelled":
        finish(run, "cancelled");
        break;
      default:
        if (!run.done && run.status !== "running") setStatus(run, "running");
    }
  }

  // --- runs ---------------------------------------------------------------------------------

  function newRun(text) {
    const item = el("li", "run");
    const article = el("article");
    const head = el("div", "run-head");
    const question = el("p", "question", text || "(a run)");
    state.cards += 1;
    question.id = `question-${state.cards}`;
    const status = el("span", "run-status", "sending");
    head.append(question, status);
    const answer = el("p", "answer");
    const details = el("details", "run-timeline");
    details.open = true;
    const summary = el("summary", "", "Timeline");
    const timeline = el("ol", "timeline");
    details.append(summary, timeline);
    article.append(head, answer, details);
    item.append(article);
    ui.runs.append(item);
    return {
      id: null,
      item,
      head,
      question,
      statusEl: status,
      status: "sending",
      answer,
      answerText: "",
      timeline,
      summary,
      events: 0,
      firstTs: null,
      last: null, // the last timeline row, for coalescing streamed events
      tools: new Map(), // call_id -> {status, duration}
      cancelButton: null,
      cancelling: false,
      done: false,
    };
  }

  function attach(run, runId) {
    run.id = runId;
    run.item.dataset.runId = runId;
    state.runs.set(runId, run);
    if (!run.done && !run.cancelButton) {
      const button = el("button", "cancel", "Cancel");
      button.type = "button";
      button.setAttribute("aria-describedby", run.question.id); // which run it cancels
      button.disabled = !state.ws || state.ws.readyState !== WebSocket.OPEN;
      button.addEventListener("click", () => cancelRun(run));
      run.head.append(button);
      run.cancelButton = button;
    }
  }

  function setStatus(run, status) {
    run.status = status;
    run.statusEl.textContent = status;
    run.item.dataset.status = status;
  }

  function finish(run, status) {
    run.done = true;
    setStatus(run, status);
    if (run.cancelButton) {
      run.cancelButton.remove();
      run.cancelButton = null;
    }
  }

  function cancelRun(run) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || run.done || !run.id) return;
    ws.send(JSON.stringify({ type: "cancel", run_id: run.id }));
    run.cancelling = true;
    run.cancelButton.disabled = true;
    setStatus(run, "cancelling");
  }

  function sendMessage(text) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    state.sent += 1;
    const msgId = `m-${Date.now().toString(36)}-${state.sent}`;
    ws.send(JSON.stringify({ type: "user_message", text, client_msg_id: msgId }));
    state.pending.set(msgId, newRun(text));
    keepScrolled(true);
    return true;
  }

  // --- timeline -----------------------------------------------------------------------------

  function addToTimeline(run, event, data) {
    run.events += 1;
    run.summary.textContent = `Timeline (${run.events} event${run.events === 1 ? "" : "s"})`;
    const offset =
      run.firstTs !== null && typeof event.ts === "number"
        ? `+${(event.ts - run.firstTs).toFixed(2)} s`
        : "";
    if (run.last && run.last.type === event.type && COALESCED.has(event.type)) {
      const row = run.last;
      row.count += 1;
      row.li.dataset.lastSeq = String(event.seq);
      row.seq.textContent = `#${row.firstSeq}–${event.seq}`;
      row.label.textContent = `${label(event.type)} ×${row.count}`;
      if (event.type === "agent_thinking" && typeof data.reasoning === "string") {
        row.detail.textContent = clip(row.detail.textContent + data.reasoning, 2000);
      }
      return;
    }
    const li = el("li", `event event-${event.type}`);
    li.dataset.type = event.type;
    li.dataset.seq = String(event.seq);
    li.dataset.lastSeq = String(event.seq); // coalesced rows cover seq to lastSeq
    const seq = el("span", "seq", `#${event.seq}`);
    const time = el("span", "offset", offset);
    const name = el("span", "label", label(event.type));
    const detail = el("span", "detail");
    li.append(seq, time, name, detail);
    fillDetail(run, li, detail, event, data);
    run.timeline.append(li);
    run.last = {
      type: event.type,
      firstSeq: event.seq,
      count: 1,
      li,
      seq,
      label: name,
      detail,
    };
  }

  function label(type) {
    return (
      {
        agent_started: "started",
        agent_thinking: "thinking",
        tool_executing: "tool call",
        tool_completed: "tool result",
        partial_result: "answer",
        agent_completed: "completed",
        agent_error: "error",
        agent_cancelled: "cancelled",
      }[type] || type
    );
  }

  function fillDetail(run, li, detail, event, data) {
    switch (event.type) {
      case "agent_started":
        detail.textContent = `agent ${data.agent_name}`;
        break;
      case "agent_thinking":
        detail.textContent = clip(String(data.reasoning ?? ""), 2000);
        break;
      case "tool_executing": {
        const name = el("code", "tool-name", String(data.tool_name));
        const params = el("code", "tool-params", json(data.parameters));
        const status = el("span", "tool-status", "running");
        const duration = el("span", "tool-duration");
        detail.append(name, params, status, duration);
        run.tools.set(data.call_id, { status, duration, li });
        li.dataset.toolStatus = "running";
        break;
      }
      case "tool_completed": {
        const status = String(data.status);
        const duration = formatMs(data.duration_ms);
        const outcome =
          status === "ok"
            ? `→ ${json(data.results, 200)}`
            : `${data.error ? `${data.error.type}: ${data.error.message}` : ""}`;
        detail.append(
          el("code", "tool-name", String(data.tool_name)),
          el("span", "tool-status", status),
          el("span", "tool-duration", duration),
          el("span", "tool-outcome", clip(outcome, 300)),
        );
        li.dataset.toolStatus = status;
        const call = run.tools.get(data.call_id);
        if (call) {
          call.status.textContent = status;
          call.duration.textContent = duration;
          call.li.dataset.toolStatus = status;
        }
        break;
      }
      case "partial_result":
        break;
      case "agent_completed":
        detail.textContent = String(data.status ?? "ok");
        break;
      case "agent_error": {
        const error = data.error || {};
        detail.textContent = `${error.type}: ${error.message}`;
        break;
      }
      case "agent_cancelled":
        detail.textContent = `reason ${data.reason}`;
        break;
      default:
        detail.textContent = json(data);
    }
  }

  // --- sign-in ------------------------------------------------------------------------------

  function askForToken(error) {
    disconnect();
    state.token = null;
    state.connectedOnce = false;
    sessionStorage.removeItem(TOKEN_KEY);
    ui.signIn.hidden = false;
    ui.chat.hidden = true;
    ui.signOut.hidden = true;
    ui.signInError.textContent = error || "";
    setConnection("offline", "Not connected");
    ui.tokenInput.focus();
  }

  function signIn(token) {
    if (sessionStorage.getItem(TOKEN_KEY) !== token) {
      // Another token may be another user: their stream is not this one.
      sessionStorage.removeItem(SESSION_KEY);
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    state.token = token;
    state.sessionId = sessionStorage.getItem(SESSION_KEY);
    state.lastSeq = 0; // replay the session's kept events: a reload shows its runs again
    state.hasStream = false;
    ui.signIn.hidden = true;
    ui.signInError.textContent = "";
    ui.chat.hidden = false;
    ui.signOut.hidden = false;
    connect();
  }

  function signOut() {
    disconnect();
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(SESSION_KEY);
    state.sessionId = null;
    state.runs.clear();
    state.pending.clear();
    ui.runs.replaceChildren();
    showNotice("");
    ui.chat.hidden = true;
    askForToken("");
  }

  // --- wiring -------------------------------------------------------------------------------

  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = ui.tokenInput.value.trim();
    ui.tokenInput.value = "";
    if (token) signIn(token);
  });

  ui.messageForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.message.value.trim();
    if (text && sendMessage(text)) ui.message.value = "";
    ui.message.focus();
  });

  ui.signOut.addEventListener("click", signOut);

  window.addEventListener("online", () => {
    if (state.retryTimer !== null) connect();
  });

  // A token in the address signs in directly (a link can open a session); it is kept
  // in sessionStorage for reloads and removed from the address bar and history.
  const address = new URL(location.href);
  const fromAddress = address.searchParams.get("token");
  if (fromAddress) {
    address.searchParams.delete("token");
    history.replaceState(null, "", `${address.pathname}${address.search}${address.hash}`);
    signIn(fromAddress);
  } else if (sessionStorage.getItem(TOKEN_KEY)) {
    signIn(sessionStorage.getItem(TOKEN_KEY));
  } else {
    askForToken("");
  }
})();
