#!/usr/bin/env bash
# The web console in headless Chromium: starts `lorahost serve` (default model, API keys, a temp
# adapters dir) on a loopback port and runs server/console/test/console.spec.mjs against it with
# playwright-core driving Debian's chromium (no browser download).
#
#   scripts/console-test.sh [path/to/lorahost]      # default: target/release/lorahost
#
# Installs what a bare Debian 12 machine lacks: chromium, nodejs and npm (apt), and
# playwright-core (npm, into target/console-test/, pinned). Screenshots go to $SCREENSHOT_DIR
# (default: a temp dir, printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

PLAYWRIGHT_CORE_VERSION=1.61.1   # the last release that runs on Debian 12's Node 18
bin=${1:-target/release/lorahost}
[ -x "$bin" ] || { echo "console-test: no lorahost binary at $bin (cargo build --release -p lorahost)" >&2; exit 1; }

need_apt=()
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

node_dir=target/console-test
if [ "$(cat "$node_dir/.version" 2>/dev/null)" != "$PLAYWRIGHT_CORE_VERSION" ]; then
  # playwright-core has no install script: it never downloads a browser.
  npm install --no-save --no-audit --no-fund --ignore-scripts --loglevel=error \
    --prefix "$node_dir" "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null
  echo "$PLAYWRIGHT_CORE_VERSION" >"$node_dir/.version"
fi

work=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ]; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
shots=${SCREENSHOT_DIR:-$(mktemp -d)}
mkdir -p "$shots"

user_key=console-test-user-$RANDOM$RANDOM
admin_key=console-test-admin-$RANDOM$RANDOM
cat >"$work/keys.toml" <<EOF
[[keys]]
key = "$user_key"
tenant = "alice"

[[keys]]
key = "$admin_key"
tenant = "ops"
admin = true
EOF

"$bin" serve --host 127.0.0.1 --port 0 --adapters-dir "$work/adapters" --api-keys "$work/keys.toml" \
  --kv-cache-bytes $((128 << 20)) 2>"$work/server.log" &
server=$!
url=
for _ in $(seq 1 600); do
  url=$(grep -o 'serving .* on http://127\.0\.0\.1:[0-9]*' "$work/server.log" | grep -o 'http://.*' || true)
  [ -n "$url" ] && break
  kill -0 "$server" 2>/dev/null || break
  sleep 0.5
done
if [ -z "$url" ]; then
  echo "console-test: the server did not start; its log:" >&2
  cat "$work/server.log" >&2
  exit 1
fi

status=0
CONSOLE_URL=$url USER_KEY=$user_key ADMIN_KEY=$admin_key \
  ADAPTER_DIR=server/tests/fixtures/golden/adapters/a_r8_qv \
  PLAYWRIGHT_DIR=$node_dir SCREENSHOT_DIR=$shots \
  node server/console/test/console.spec.mjs || status=$?
if [ "$status" -ne 0 ]; then
  echo "console-test: the server's log:" >&2
  tail -n 40 "$work/server.log" >&2
fi
echo "console-test: screenshots in $shots"
exit "$status"
