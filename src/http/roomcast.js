/**
 * roomcast.js: a browser client for roomcast's `roomcast.v1` protocol, served by roomcast
 * itself as `GET /roomcast.js`. One ES module, no dependencies, no build step; the demo page
 * (`/`) is built on it.
 *
 * What it adds to a bare WebSocket: it reconnects after an unexpected close with full-jitter
 * exponential backoff, asking for a fresh token each time, and resumes where it left off
 * (`since`/`epoch`), so a page neither misses a message nor shows one twice; it turns the
 * room's reaction totals into "how many since the last totals", which is what a page animates.
 *
 *     import { connect } from "https://chat.example/roomcast.js";
 *     const room = connect({
 *       room: "stage",                                   // on the server this file came from
 *       token: () => fetch("/my/roomcast-token").then((r) => r.text()),   // omit in open mode
 *       onMessage: (m) => console.log(m.from.name ?? "server", m.data ?? m.text),
 *       onPresence: ({ clients }) => console.log(clients, "watching"),
 *       onReactions: ({ totals, added }) => console.log(totals, added),
 *     });
 *     room.publish({ text: "hi" });   // false while not connected: nothing is queued
 *
 * `connect(options)` returns at once and connects in the background. Options:
 *
 * | option | meaning |
 * | --- | --- |
 * | `url` | the room's `ws://` or `wss://` URL (`http(s)://` is turned into `ws(s)://`) |
 * | `room` | instead of `url`: a room name on the server this module was loaded from |
 * | `token` | a join token: a string, or a function returning one or a Promise of one, called again before every connection (so an expired token is replaced on reconnect); none in open mode |
 * | `name` | open mode's display name (`?name=`); a server that checks tokens takes the token's |
 * | `onMessage(message, { history })` | every `message` frame of the room once, in the room's order; `history` is true for those from the welcome (on join, or the ones missed while reconnecting) |
 * | `onPresence({ clients, users })` | the room's audience, on join and whenever it changes |
 * | `onReactions({ totals, added })` | the room's running totals per key, and how many each key gained since the last totals this page saw (empty on a first join or a new epoch: nothing to animate) |
 * | `onError({ code, message, fatal })` | `bad_request` / `forbidden` error frames (not fatal); `token` when the token getter failed (retried); `refused`, `removed`, `policy`, `protocol` when this connection is over for good (fatal) |
 * | `onStatus(status, detail)` | `"connecting"`, `"connected"`, `"reconnecting"`, `"closed"` or `"failed"` (below) |
 * | `backoff` | `{ baseMs: 500, capMs: 30000, stableMs: 60000 }`: the n-th retry waits a random time up to min(capMs, baseMs × 2ⁿ); a connection that lasted stableMs starts again at n = 0 |
 * | `maxRefusals` | 3: connections refused in a row by a server that answers HTTP before giving up (`Infinity`: never) |
 *
 * Statuses, and their `detail`:
 * - `connecting` `{}`: the first attempt is under way.
 * - `connected` `{ you, room, epoch, seq, recovered, reset, history }`: a `welcome` arrived;
 *   this comes before its `history` messages are delivered. `reset` is true on the first join
 *   and whenever the server could not resume (`recovered: false`: a new epoch, or more missed
 *   than it retains): the page should clear what it shows, since the history that follows
 *   replaces it. Otherwise the `history` messages that follow are exactly the ones missed.
 * - `reconnecting` `{ attempt, delayMs, code, reason }`: dropped; trying again in `delayMs`.
 * - `closed` `{ code, reason }`: the server ended the session for good: `4003` (removed by a
 *   moderator, with the reason), `1008` (rate or policy), `1002`/`1003`/`1007`/`1009` (a
 *   protocol error, a bug in the page). No reconnect: reconnecting would only repeat it.
 * - `failed` `{ refusals }`: the upgrade was refused `maxRefusals` times in a row while the
 *   server answered HTTP. A browser is never shown why a WebSocket upgrade failed, so this is
 *   how a `401` (no token, a bad or expired one), a `403` (another room's token, a ban) or a
 *   refused origin shows; a server that is down or restarting is retried without limit.
 *
 * The returned object: `publish(data)` sends any JSON value as a `message` to the room and
 * returns whether it was sent (false while not connected; it is not queued, so nothing is sent
 * twice); `react(key)` sends one reaction tap (1 to 32 bytes of UTF-8), fire and forget: taps
 * are counted into the totals, never echoed one by one; `close()` ends the connection, and no
 * callback runs after it; `status` and `you` (the identity the welcome gave) read the present.
 *
 * Callbacks that throw are reported (`reportError`) without disturbing the connection.
 */

/** The subprotocol offered on every upgrade. */
export const PROTOCOL = "roomcast.v1";

/** Close codes after which reconnecting would only be refused or closed again. */
const FINAL_CLOSES = new Map([
  [1002, ["protocol", "protocol error"]],
  [1003, ["protocol", "the server does not take binary frames from roomcast.v1 clients"]],
  [1007, ["protocol", "invalid UTF-8"]],
  [1008, ["policy", "closed by the server's policy (over the rate limit?)"]],
  [1009, ["protocol", "message too big"]],
  [4003, ["removed", "removed by a moderator"]],
]);

const DEFAULT_BACKOFF = { baseMs: 500, capMs: 30000, stableMs: 60000 };
const MAX_REACTION_KEY_BYTES = 32;
/** How long the reachability check after a refused upgrade may take. */
const PROBE_TIMEOUT_MS = 5000;

/**
 * Joins a room and stays in it until `close()` or a final close. See the module's header.
 * @param {object} options
 * @returns {{publish(data: any): boolean, react(key: string): boolean, close(): void,
 *            readonly status: string, readonly you: object | null}}
 */
export function connect(options = {}) {
  const baseUrl = roomUrl(options);
  const backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
  const maxRefusals = options.maxRefusals ?? 3;

  /** The socket of the current attempt; null between attempts. */
  let socket = null;
  /** Whether the current socket's welcome arrived: only then may it publish. */
  let welcomed = false;
  /** Each attempt's number: callbacks of an earlier attempt's socket or probe are ignored. */
  let generation = 0;
  let retryTimer = null;
  /** Retries since the last stable connection: the backoff's exponent. */
  let attempt = 0;
  /** Upgrades refused in a row by a server that answered HTTP. */
  let refusals = 0;
  let welcomedAt = 0;
  let isClosed = false;
  let status = "connecting";
  let you = null;
  // The resume point: the room's epoch and the last seq delivered in it. Messages are
  // delivered in seq order, so one number dedupes: anything at or below it was delivered.
  let epoch = null;
  let lastSeq = -1;
  /** The last reaction totals seen in `epoch`: the baseline for `added`. */
  let totals = null;

  const report = (callback, ...args) => {
    if (isClosed || typeof callback !== "function") return;
    try {
      callback(...args);
    } catch (err) {
      // The page's bug: surface it, but keep the connection's state intact.
      if (typeof reportError === "function") reportError(err);
      else console.error(err);
    }
  };
  const setStatus = (next, detail) => {
    status = next;
    report(options.onStatus, next, detail);
  };
  const fail = (code, message, fatal) => report(options.onError, { code, message, fatal });

  async function open() {
    retryTimer = null;
    const current = ++generation;
    let token = null;
    try {
      token = typeof options.token === "function" ? await options.token() : options.token;
      // A token never holds whitespace; a backend or `roomcast token` may end one with a newline.
      if (typeof token === "string") token = token.trim();
    } catch (err) {
      if (isClosed || current !== generation) return;
      fail("token", `the token getter failed: ${err?.message ?? err}`, false);
      retry({ code: 0, reason: "no token" });
      return;
    }
    if (isClosed || current !== generation) return;
    const url = new URL(baseUrl);
    if (token) url.searchParams.set("token", String(token));
    if (options.name) url.searchParams.set("name", String(options.name));
    if (epoch !== null) {
      url.searchParams.set("since", String(lastSeq));
      url.searchParams.set("epoch", epoch);
    }
    let ws;
    try {
      ws = new WebSocket(url, PROTOCOL);
    } catch (err) {
      // Only a URL the browser will not open at all (a blocked port, say): no retry helps.
      fail("refused", `the browser will not open ${baseUrl}: ${err?.message ?? err}`, true);
      setStatus("failed", { refusals });
      return;
    }
    socket = ws;
    welcomed = false;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (event) => {
      if (socket === ws && typeof event.data === "string") receive(event.data);
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      welcomed = false;
      dropped(event, opened, current);
    };
  }

  function receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (_) {
      return; // not a v1 frame; the server sends none such
    }
    switch (frame?.type) {
      case "welcome":
        return welcome(frame);
      case "message":
        return deliver(frame, false);
      case "presence":
        return report(options.onPresence, { clients: frame.clients, users: frame.users });
      case "reactions":
        return reactions(frame.totals);
      case "error":
        return fail(frame.code, frame.message, false);
      default:
        return; // a frame type from a later protocol version: not ours to handle
    }
  }

  function welcome(frame) {
    const recovered = frame.recovered === true && frame.epoch === epoch;
    if (frame.epoch !== epoch) totals = null; // totals count from the epoch's start
    if (!recovered) lastSeq = -1; // the history replaces what was delivered
    epoch = frame.epoch;
    you = frame.you ?? null;
    welcomed = true;
    welcomedAt = Date.now();
    refusals = 0;
    const history = Array.isArray(frame.history) ? frame.history : [];
    setStatus("connected", {
      you,
      room: frame.room,
      epoch,
      seq: frame.seq,
      recovered,
      reset: !recovered,
      history: history.filter((m) => m.seq > lastSeq).length,
    });
    for (const message of history) deliver(message, true);
    if (typeof frame.seq === "number" && frame.seq > lastSeq) lastSeq = frame.seq;
    if (frame.presence) {
      report(options.onPresence, { clients: frame.presence.clients, users: frame.presence.users });
    }
    reactions(frame.reactions ?? {});
  }

  function deliver(message, history) {
    if (typeof message?.seq !== "number" || message.seq <= lastSeq) return; // seen already
    lastSeq = message.seq;
    report(options.onMessage, message, { history });
  }

  function reactions(next) {
    if (!next || typeof next !== "object") return;
    const added = {};
    if (totals !== null) {
      for (const [key, count] of Object.entries(next)) {
        const gained = count - (totals[key] ?? 0);
        if (gained > 0) added[key] = gained;
      }
    }
    totals = { ...next };
    report(options.onReactions, { totals: { ...next }, added });
  }

  async function dropped(event, opened, current) {
    if (isClosed) return;
    const final = FINAL_CLOSES.get(event.code);
    if (final) {
      const [code, fallback] = final;
      const reason = event.reason || fallback;
      fail(code, reason, true);
      setStatus("closed", { code: event.code, reason });
      return;
    }
    if (welcomedAt && Date.now() - welcomedAt >= backoff.stableMs) attempt = 0;
    welcomedAt = 0;
    if (!opened) {
      // Refused before the 101, or never reached: the browser does not say which. A server
      // that answers HTTP refused this upgrade (401, 403, an origin it does not allow);
      // one that does not is down or restarting, and is worth waiting for.
      const answer = await probe(baseUrl);
      if (isClosed || current !== generation) return;
      if (answer === "answering") refusals += 1;
      else refusals = 0;
      if (refusals >= maxRefusals) {
        const message =
          `the server refused the connection ${refusals} times: a missing, invalid or ` +
          "expired join token, one for another room, a ban, or an origin it does not allow";
        fail("refused", message, true);
        setStatus("failed", { refusals });
        return;
      }
    }
    retry({ code: event.code, reason: event.reason });
  }

  function retry({ code, reason }) {
    const ceiling = Math.min(backoff.capMs, backoff.baseMs * 2 ** Math.min(attempt, 30));
    const delayMs = Math.round(Math.random() * ceiling); // full jitter: no stampede
    attempt += 1;
    setStatus("reconnecting", { attempt, delayMs, code, reason });
    retryTimer = setTimeout(open, delayMs);
  }

  /** Back online: waiting out the backoff would only delay the catch-up. */
  const online = () => {
    if (retryTimer !== null) {
      clearTimeout(retryTimer);
      open();
    }
  };
  if (typeof addEventListener === "function") addEventListener("online", online);

  setStatus("connecting", {});
  open();

  return {
    publish(data) {
      if (data === undefined) throw new TypeError("publish needs a JSON value");
      if (!welcomed || socket?.readyState !== WebSocket.OPEN) return false;
      socket.send(JSON.stringify({ type: "publish", data }));
      return true;
    },
    react(key) {
      const bytes = typeof key === "string" ? new TextEncoder().encode(key).length : 0;
      if (bytes < 1 || bytes > MAX_REACTION_KEY_BYTES) {
        throw new TypeError("a reaction key is 1 to 32 bytes of UTF-8");
      }
      if (!welcomed || socket?.readyState !== WebSocket.OPEN) return false;
      socket.send(JSON.stringify({ type: "react", key }));
      return true;
    },
    close() {
      if (isClosed) return;
      isClosed = true;
      generation += 1;
      clearTimeout(retryTimer);
      retryTimer = null;
      if (typeof removeEventListener === "function") removeEventListener("online", online);
      const ws = socket;
      socket = null;
      ws?.close(1000, "closed by the page");
      status = "closed";
    },
    get status() {
      return status;
    },
    get you() {
      return you;
    },
  };
}

/** The room's WebSocket URL from `url` or `room`, without token or resume parameters. */
function roomUrl({ url, room }) {
  let result;
  if (url) {
    result = new URL(url, globalThis.location?.href);
  } else if (room) {
    result = new URL(`/ws/${encodeURIComponent(room)}`, import.meta.url);
  } else {
    throw new TypeError("connect needs a url or a room");
  }
  if (result.protocol === "http:") result.protocol = "ws:";
  if (result.protocol === "https:") result.protocol = "wss:";
  if (result.protocol !== "ws:" && result.protocol !== "wss:") {
    throw new TypeError(`not a WebSocket URL: ${result.protocol}`);
  }
  return result;
}

/**
 * Whether the server behind `wsUrl` answers HTTP: `"answering"`, `"busy"` (a `503`: full or
 * shutting down, worth waiting for) or `"unreachable"`. It asks for `/healthz` beside the
 * room's `/ws/...` path. Cross-origin the answer is opaque (no CORS needed for that), which
 * still tells that the server answered.
 */
async function probe(wsUrl) {
  const health = new URL(wsUrl);
  health.protocol = wsUrl.protocol === "wss:" ? "https:" : "http:";
  health.pathname = health.pathname.replace(/\/ws(\/[^/]*)?$/, "") + "/healthz";
  health.search = "";
  try {
    const response = await fetch(health, {
      mode: "no-cors",
      cache: "no-store",
      credentials: "omit",
      signal: AbortSignal.timeout(PROBE_TIMEOUT_MS),
    });
    if (response.type === "opaque" || response.status === 200) return "answering";
    return response.status === 503 ? "busy" : "unreachable";
  } catch (_) {
    return "unreachable";
  }
}
