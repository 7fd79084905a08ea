#!/usr/bin/env bash
# Real clients against the gateway: the official QuickBlox JavaScript SDK (npm `quickblox`,
# HTTPS only) and a browser app on another origin calling it with fetch in headless
# Chromium (CORS preflight). Needs Node.js and npm; installs the SDK's Node packages and
# Chromium (apt-get, through sudo unless root) when missing; starts qb-mock, two gateways
# (TLS for the SDK, cleartext with CORS for the browser) and two static page servers on
# free loopback ports, and stops them however the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "clients/run.sh: $tool is missing; install Node.js (with npm) first" >&2; exit 1; }
done
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
fi
(cd clients/quickblox-sdk && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
# The same build as the test suite's (features unified with the tests'), so after the
# suite this builds nothing new rather than a second copy of every dependency.
cargo build -q --locked --workspace --all-targets
# Wherever cargo put them: CARGO_TARGET_DIR and build.target-dir move the target directory.
target=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target/debug

# Every server below is started directly in the background (no subshell), so its pid is
# the one in pids and the trap stops it however the script ends.
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# A private CA and a certificate for 127.0.0.1, trusted by Node through NODE_EXTRA_CA_CERTS.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=test CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$work/key.pem" -out "$work/cert.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$work/ext"
openssl x509 -req -in "$work/cert.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 2 -extfile "$work/ext" -out "$work/cert.pem" 2>/dev/null

TOKEN=sdk-client-token-0123
DIGEST=$(printf %s "$TOKEN" | "$bin/reset-gateway" hash-token)
MOCK=$(free_port); TLS=$(free_port); PLAIN=$(free_port); PAGE=$(free_port); OTHER=$(free_port)
"$bin/qb-mock" --listen 127.0.0.1:$MOCK --api-key server-key-for-clients --user alice@example.com >/dev/null & pids+=($!)
config() { # listen, extra server keys
  cat <<YAML
server:
  listen: "127.0.0.1:$1"
$2
admin: { listen: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:$MOCK" }
guard:
  clients: [{ id: sdk, token_sha256: $DIGEST }]
  responses: { uniform: false }
YAML
}
config "$TLS" "  tls: { cert_file: $work/cert.pem, key_file: $work/key.pem }" > "$work/tls.yaml"
config "$PLAIN" "  cors: { allow_origins: [\"http://127.0.0.1:$PAGE\"] }" > "$work/plain.yaml"
QB_API_KEY=server-key-for-clients "$bin/reset-gateway" --config "$work/tls.yaml" 2>"$work/tls.log" & pids+=($!)
QB_API_KEY=server-key-for-clients "$bin/reset-gateway" --config "$work/plain.yaml" 2>"$work/plain.log" & pids+=($!)
python3 -m http.server "$PAGE" --bind 127.0.0.1 --directory clients/browser >/dev/null 2>&1 & pids+=($!)
python3 -m http.server "$OTHER" --bind 127.0.0.1 --directory clients/browser >/dev/null 2>&1 & pids+=($!)
for p in $MOCK $TLS $PLAIN $PAGE $OTHER; do wait_port "$p"; done

passed=0; failed=0
check() { # name, command that must succeed
  if eval "$2"; then echo "ok   $1"; passed=$((passed + 1)); else echo "FAIL $1"; failed=$((failed + 1)); fi
}
sdk() { NODE_EXTRA_CA_CERTS="$work/ca.pem" node clients/quickblox-sdk/reset.js "127.0.0.1:$TLS" "$@" 2>/dev/null; }
forwarded() { grep -c '"outcome":"forwarded"' "$1" || true; }

check "SDK resetPassword through the gateway (HTTPS, QB-Token)" \
  'sdk "$TOKEN" alice@example.com | grep -q "reset ok" && [ "$(forwarded "$work/tls.log")" = 1 ]'
check "SDK with an unknown client token gets 401" \
  '{ sdk wrong-token alice@example.com || true; } | grep -q "\"code\":401"'
check "SDK with an invalid address gets 422" \
  '{ sdk "$TOKEN" not-an-address || true; } | grep -q "\"code\":422"'

chrome() { # page origin port -> the page's data-result
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$work/chrome-$1" --virtual-time-budget=15000 \
    --dump-dom "http://127.0.0.1:$1/page.html?gateway=http://127.0.0.1:$PLAIN&token=$TOKEN&email=alice@example.com" 2>/dev/null \
    | grep -o 'data-result="[^"]*"'
}
check "browser fetch from an allowed origin (preflight with traceparent, then 200 with X-Request-Id exposed)" \
  'chrome "$PAGE" | grep -Eq "status=200 request-id=[0-9a-f]{32}"'
check "browser fetch from another origin is blocked by CORS" \
  'chrome "$OTHER" | grep -q "error=TypeError"'

echo "clients: $passed passed, $failed failed"
[ "$failed" = 0 ]
