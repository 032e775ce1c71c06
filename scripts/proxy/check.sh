#!/usr/bin/env bash
# Runs roomcast behind nginx and behind Caddy, both terminating TLS with a throwaway
# self-signed certificate on loopback, and checks HTTPS and wss:// through each.
# Needs nginx, caddy, openssl and node (Debian: nginx-light caddy openssl nodejs).
set -euo pipefail
cd "$(dirname "$0")/../.."

work="$PWD/target/proxy"
rm -rf "$work" && mkdir -p "$work"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost" -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nginx_port=$(free_port); caddy_port=$(free_port)

cargo build --release --locked --quiet
./target/release/roomcast --listen 127.0.0.1:0 --log-level info 2>"$work/roomcast.log" &
pids=($!)
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do grep -q "listening on" "$work/roomcast.log" && break; sleep 0.1; done
roomcast_port=$(grep -o "listening on ws://[0-9.]*:[0-9]*" "$work/roomcast.log" | sed 's/.*://')

fill() {
    sed -e "s|@WORK@|$work|g" -e "s|@NGINX_PORT@|$nginx_port|g" -e "s|@CADDY_PORT@|$caddy_port|g" \
        -e "s|@ROOMCAST_PORT@|$roomcast_port|g" "$1" > "$2"
}
fill scripts/proxy/nginx.conf "$work/nginx.conf"
fill scripts/proxy/Caddyfile "$work/Caddyfile"

nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' 2>"$work/nginx.log" &
pids+=($!)
XDG_DATA_HOME="$work/caddy-data" XDG_CONFIG_HOME="$work/caddy-config" \
    caddy run --config "$work/Caddyfile" --adapter caddyfile >"$work/caddy.log" 2>&1 &
pids+=($!)
for port in "$nginx_port" "$caddy_port"; do
    for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

export NODE_EXTRA_CA_CERTS="$work/cert.pem"
node --experimental-websocket --no-warnings scripts/proxy/wss-check.mjs "https://localhost:$nginx_port"
node --experimental-websocket --no-warnings scripts/proxy/wss-check.mjs "https://localhost:$caddy_port"
