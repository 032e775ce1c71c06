// The roomcast demo page's script, served as /demo.js so the page's Content-Security-Policy
// can forbid every inline script (see endpoints.rs). A module: it imports the browser client,
// /roomcast.js, as any page would, and keeps only what is the page's own: the DOM, the
// message convention ({"type": "chat", "text": ...} as data) and the animations.
import { connect } from "/roomcast.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// The server's rule; "." and ".." would be resolved away by the URL itself.
const validRoom = (r) => /^[A-Za-z0-9_.\-]{1,64}$/.test(r) && r !== "." && r !== "..";
const KEYS = ["❤️", "👏", "😂"];
/** The log keeps this many lines; older ones scroll away for good. */
const MAX_LINES = 300;
/** At most this many emojis float up per key per totals frame, however many taps it counts. */
const MAX_FLOATS = 8;

let roomName = validRoom(params.get("room") || "") ? params.get("room") : "lobby";
let nick = params.get("name") || params.get("nick") || localStorage.getItem("roomcast-nick") ||
  "viewer-" + Math.floor(1000 + Math.random() * 9000);
// Per tab and kept across a reload, but never in the page's URL (which users share).
let token = sessionStorage.getItem("roomcast-token") || "";
let room = null;
let floated = 0;

function setState(state, text) {
  $("state").dataset.state = state;
  $("state-text").textContent = text;
}

function colorFor(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.codePointAt(0)) >>> 0;
  // The golden angle apart: ids that differ in their last digit (anon-6, anon-7) still get
  // hues far from each other.
  return `hsl(${(h * 137.508) % 360} 75% 70%)`;
}

/** A log line. Everything goes in through textContent, never innerHTML: it is untrusted. */
function addLine({ text, system = false, sender = null, ts = Date.now(), seq = null, history = false }) {
  const li = document.createElement("li");
  if (seq !== null) li.dataset.seq = seq;
  if (history) li.className = "history";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  li.append(time);
  if (sender) li.append(senderLabel(sender));
  const body = document.createElement("span");
  body.className = system ? "system" : "text";
  body.textContent = text;
  li.append(body);
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(li);
  while (log.children.length > MAX_LINES) log.firstChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

/**
 * Who sent a message, as the server says: a name its join token proved gets a check mark,
 * an open room's self-chosen name is marked as unverified, and a backend publish is "server".
 */
function senderLabel(from) {
  const who = document.createElement("span");
  who.className = "nick";
  if (from.server) {
    who.classList.add("server");
    who.textContent = "server";
    return who;
  }
  const name = String(from.name ?? from.id ?? "?");
  who.style.color = colorFor(String(from.id ?? name));
  who.textContent = name;
  const mark = document.createElement("span");
  if (from.verified) {
    mark.className = "verified";
    mark.textContent = "✓";
    mark.title = `verified: ${from.id}`;
  } else {
    mark.className = "unverified";
    mark.textContent = "guest";
    mark.title = "an open room's name: anyone may choose it";
  }
  who.append(mark);
  return who;
}

/** The text a message shows: the page's convention, else whatever it carries. */
function messageText(message) {
  if (typeof message.text === "string") return message.text; // a plain client's text
  if (message.binary !== undefined) return `[binary message, ${atob(message.binary).length} bytes]`;
  const data = message.data;
  if (typeof data === "string") return data;
  if (data && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}

function floatUp(emoji) {
  const el = document.createElement("div");
  el.className = "float";
  el.textContent = emoji;
  el.style.left = (10 + Math.random() * 80) + "%";
  el.style.setProperty("--drift", (Math.random() * 80 - 40) + "px");
  el.style.animationDelay = (Math.random() * 0.4) + "s";
  $("floats").append(el);
  el.addEventListener("animationend", () => el.remove());
  floated += 1;
  $("floats").dataset.floated = floated;
}

function statusLine(status, detail) {
  switch (status) {
    case "connecting":
      return setState("connecting", "connecting…");
    case "connected": {
      const you = detail.you;
      setState("connected", "connected");
      $("you").replaceChildren(document.createTextNode("you: "), senderLabel(you));
      $("text").disabled = $("send").disabled = you.perm !== "post";
      $("text").placeholder = you.perm === "post" ? "Say something…" : "Your token may not post here";
      for (const button of $("reactions").querySelectorAll("button")) button.disabled = you.perm === "read";
      if (detail.reset) {
        // The welcome's history replaces whatever the log showed (a new epoch, or a gap too
        // long to fill): redraw from it rather than show a hole.
        $("log").replaceChildren();
        const earlier = detail.history > 0 ? " Recent messages:" : "";
        addLine({ system: true, text: `Joined #${detail.room} as ${you.name}.${earlier}` });
      } else {
        const missed = detail.history === 1 ? "1 missed message" : `${detail.history} missed messages`;
        addLine({ system: true, text: `Reconnected; caught up on ${missed}.` });
      }
      return;
    }
    case "reconnecting":
      return setState("reconnecting", `reconnecting in ${(detail.delayMs / 1000).toFixed(1)} s (try ${detail.attempt})…`);
    case "closed":
      setState("offline", `disconnected: ${detail.reason}`);
      return addLine({ system: true, text: `Disconnected (${detail.code}): ${detail.reason}. Press Join to come back.` });
    case "failed":
      return setState("offline", "refused: check the token");
  }
}

function showTotals({ totals, added }) {
  for (const key of KEYS) $("tally-" + key).textContent = totals[key] ?? 0;
  for (const [key, count] of Object.entries(added)) {
    if (!KEYS.includes(key)) continue;
    for (let i = 0; i < Math.min(count, MAX_FLOATS); i += 1) floatUp(key);
  }
}

function join(newRoom, newNick, newToken) {
  roomName = newRoom;
  nick = newNick;
  token = newToken;
  localStorage.setItem("roomcast-nick", nick);
  if (token) sessionStorage.setItem("roomcast-token", token);
  else sessionStorage.removeItem("roomcast-token");
  $("room").value = roomName;
  $("nick").value = nick;
  $("token").value = token;
  $("room-label").textContent = "#" + roomName;
  $("stage-room").textContent = "#" + roomName;
  const url = new URL(location.href);
  url.searchParams.set("room", roomName);
  url.searchParams.set("name", nick);
  url.searchParams.delete("nick");
  history.replaceState(null, "", url);
  $("ws-url").textContent = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/${roomName}`;
  room?.close();
  $("log").replaceChildren();
  for (const key of KEYS) $("tally-" + key).textContent = "0";
  $("viewers").textContent = "–";
  room = connect({
    room: roomName,
    // Called again before every reconnection; a page whose tokens expire fetches one here.
    token: () => token || undefined,
    name: nick,
    onStatus: statusLine,
    onMessage: (message, { history }) => addLine({
      text: messageText(message), sender: message.from, ts: message.ts, seq: message.seq, history,
    }),
    onPresence: ({ clients, users }) => {
      $("viewers").textContent = clients;
      $("audience").title = `${clients} connections, ${users} people`;
    },
    onReactions: showTotals,
    onError: ({ code, message }) => addLine({ system: true, text: `⚠ ${code}: ${message}` }),
  });
}

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  const r = $("room").value.trim(), n = $("nick").value.trim(), t = $("token").value.trim();
  if (validRoom(r)) join(r, n || nick, t);
});
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  // Kept in the box when not connected: nothing is queued, so nothing is sent twice.
  if (text && room.publish({ type: "chat", text })) $("text").value = "";
});
$("reactions").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-emoji]");
  if (button) room.react(button.dataset.emoji);
});

join(roomName, nick, token);
