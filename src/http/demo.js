// The roomcast demo page's script, served as /demo.js so the page's Content-Security-Policy
// can forbid every inline script (see endpoints.rs). The JSON message convention
// ({"type": "chat" | "reaction", ...}) lives only here; the server relays bytes.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  // The server's rule; "." and ".." would be resolved away by the URL itself.
  const validRoom = (r) => /^[A-Za-z0-9_.\-]{1,64}$/.test(r) && r !== "." && r !== "..";
  let room = validRoom(params.get("room") || "") ? params.get("room") : "lobby";
  let nick = params.get("nick") || localStorage.getItem("roomcast-nick") || "viewer-" + Math.floor(1000 + Math.random() * 9000);
  const tally = { "❤️": 0, "👏": 0, "😂": 0 };
  let socket = null, attempt = 0, reconnectTimer = null, pollTimer = null;

  function setState(state, text) {
    $("state").dataset.state = state;
    $("state-text").textContent = text;
  }

  function colorFor(name) {
    let h = 0;
    for (const c of name) h = (h * 31 + c.codePointAt(0)) >>> 0;
    return `hsl(${h % 360} 75% 70%)`;
  }

  function addLine(parts) {
    const li = document.createElement("li");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    li.append(time);
    if (parts.nick !== undefined) {
      const who = document.createElement("span");
      who.className = "nick";
      who.style.color = colorFor(parts.nick);
      who.textContent = parts.nick;
      li.append(who);
    }
    const body = document.createElement("span");
    if (parts.system) body.className = "system";
    body.textContent = parts.text;   // textContent, never innerHTML: messages are untrusted
    li.append(body);
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(li);
    while (log.children.length > 300) log.firstChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function floatUp(emoji) {
    const el = document.createElement("div");
    el.className = "float";
    el.textContent = emoji;
    el.style.left = (10 + Math.random() * 80) + "%";
    el.style.setProperty("--drift", (Math.random() * 80 - 40) + "px");
    $("floats").append(el);
    el.addEventListener("animationend", () => el.remove());
  }

  function onMessage(data) {
    if (typeof data !== "string") {
      addLine({ system: true, text: `[binary message, ${data.size ?? data.byteLength} bytes]` });
      return;
    }
    let msg = null;
    try { msg = JSON.parse(data); } catch (_) { /* not our convention: show it as it is */ }
    if (msg && msg.type === "reaction" && Object.hasOwn(tally, msg.emoji)) {
      tally[msg.emoji] += 1;
      $("tally-" + msg.emoji).textContent = tally[msg.emoji];
      floatUp(msg.emoji);
    } else if (msg && msg.type === "chat" && typeof msg.text === "string") {
      addLine({ nick: String(msg.nick || "anonymous").slice(0, 24), text: msg.text });
    } else {
      addLine({ nick: "·", text: data });
    }
  }

  function send(obj) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  async function pollViewers() {
    try {
      const res = await fetch(`/api/rooms/${encodeURIComponent(room)}`, { cache: "no-store" });
      if (res.ok) $("viewers").textContent = (await res.json()).clients;
    } catch (_) { /* the server may be restarting; the next poll will tell */ }
  }

  function connect() {
    clearTimeout(reconnectTimer);
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/${encodeURIComponent(room)}`;
    $("ws-url").textContent = url;
    setState(attempt ? "reconnecting" : "connecting", attempt ? `reconnecting (try ${attempt + 1})…` : "connecting…");
    const ws = new WebSocket(url);
    socket = ws;
    ws.onopen = () => {
      attempt = 0;
      setState("connected", "connected");
      addLine({ system: true, text: `Joined #${room} as ${nick}.` });
      pollViewers();
    };
    ws.onmessage = (event) => onMessage(event.data);
    ws.onclose = (event) => {
      if (socket !== ws) return;   // a deliberate switch to another room
      // Exponential backoff with jitter, so a restarted server is not stampeded.
      const delay = Math.min(15000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
      attempt += 1;
      setState("reconnecting", `disconnected (${event.code || "no code"}); retrying in ${Math.round(delay / 1000)} s`);
      reconnectTimer = setTimeout(connect, delay);
    };
  }

  function join(newRoom, newNick) {
    room = newRoom;
    nick = newNick;
    localStorage.setItem("roomcast-nick", nick);
    $("room").value = room;
    $("nick").value = nick;
    $("room-label").textContent = "#" + room;
    $("stage-room").textContent = "#" + room;
    const url = new URL(location.href);
    url.searchParams.set("room", room);
    history.replaceState(null, "", url);
    const old = socket;
    socket = null;
    if (old) old.close(1000, "switching rooms");
    attempt = 0;
    connect();
    clearInterval(pollTimer);
    pollTimer = setInterval(pollViewers, 2000);
  }

  $("join").addEventListener("submit", (event) => {
    event.preventDefault();
    const r = $("room").value.trim(), n = $("nick").value.trim();
    if (validRoom(r) && n) join(r, n);
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (text && send({ type: "chat", nick, text })) $("text").value = "";
  });
  $("reactions").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-emoji]");
    if (button) send({ type: "reaction", emoji: button.dataset.emoji, nick });
  });

  join(room, nick);
})();
