// Checks one TLS endpoint in front of roomcast: HTTPS health, and a WebSocket echo over wss.
// Usage: node --experimental-websocket wss-check.mjs https://localhost:PORT
const base = process.argv[2];
const health = await fetch(`${base}/healthz`);
if (health.status !== 200 || (await health.text()) !== "ok\n") throw new Error(`healthz: ${health.status}`);
const url = base.replace(/^https/, "wss") + "/ws/tls-check";
const text = `hello over TLS ${Date.now()}`;
await new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  const timer = setTimeout(() => reject(new Error(`no echo from ${url}`)), 5000);
  ws.onopen = () => ws.send(text);
  ws.onmessage = (event) => {
    if (event.data === text) { clearTimeout(timer); ws.close(1000); resolve(); }
  };
  ws.onerror = (event) => reject(new Error(`${url}: ${event.message ?? "error"}`));
});
console.log(`ok: ${base} (healthz, wss echo)`);
