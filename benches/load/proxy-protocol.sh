#!/usr/bin/env bash
# What reading PROXY protocol headers costs the gateway, behind a TCP load balancer: one
# HAProxy in TCP mode in front of two gateways on the same upstream, one plain (HAProxy
# passes the bytes through) and one with server.proxy_protocol (HAProxy's send-proxy-v2),
# measured in turns in one run with the same load (wrk, one thread, 64 connections, a new
# address every request, nothing denied).
#
# Two connection patterns: keep-alive (wrk's connections, and HAProxy's to the gateway,
# carry many requests: the header is read once per connection) and close (a new connection,
# so a new header, for every request: the worst case).
#
# Prints requests/s and the gateway's own CPU time per request (user + system, from
# /proc; HAProxy's and qb-mock's not included) for each round, then the median of each
# and the with/without ratio.
#
#   benches/load/proxy-protocol.sh            # 10 s per measurement, three rounds
#   DURATION=5s ROUNDS=5 benches/load/proxy-protocol.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing wrk haproxy
cargo build --release -q -p reset-gateway -p qb-mock
bin=target/release

work=$(mktemp -d)
pids=()
cleanup() {
  [ -f "$work/haproxy.pid" ] && kill "$(cat "$work/haproxy.pid")" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

MOCK=$(free_port); PLAIN=$(free_port); PROXIED=$(free_port); LB_PLAIN=$(free_port); LB_PROXIED=$(free_port)
"$bin/qb-mock" --listen 127.0.0.1:$MOCK --api-key bench-server-key --all-users >/dev/null & pids+=($!)
wait_port "$MOCK"
digest=$(printf %s bench-client-token | "$bin/reset-gateway" hash-token)
config() { # listen, extra server keys
  cat <<YAML
server: { listen: "127.0.0.1:$1", workers: 1 $2 }
admin: { listen: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:$MOCK", timeout: 5s, pool_max_idle: 256 }
guard:
  clients: [{ id: bench, token_sha256: $digest }]
  limits:
    per_ip: [{ requests: 100000000, per: 1s }]
    per_email: [{ requests: 100000000, per: 1s }]
    per_client: []
    global: []
log: { level: warn }
YAML
}
config "$PLAIN" "" > "$work/plain.yaml"
config "$PROXIED" ", proxy_protocol: { trusted: [127.0.0.1], required: true }" > "$work/proxied.yaml"
QB_API_KEY=bench-server-key "$bin/reset-gateway" --config "$work/plain.yaml" 2>"$work/plain.log" & PLAIN_PID=$!; pids+=($!)
QB_API_KEY=bench-server-key "$bin/reset-gateway" --config "$work/proxied.yaml" 2>"$work/proxied.log" & PROXIED_PID=$!; pids+=($!)
cat > "$work/haproxy.cfg" <<CFG
global
    nbthread 1
    maxconn 8000
    pidfile $work/haproxy.pid
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
listen plain
    bind 127.0.0.1:$LB_PLAIN
    server gateway 127.0.0.1:$PLAIN
listen proxied
    bind 127.0.0.1:$LB_PROXIED
    server gateway 127.0.0.1:$PROXIED send-proxy-v2
CFG
haproxy -D -q -f "$work/haproxy.cfg"
wait_port "$PLAIN"; wait_port "$PROXIED"; wait_port "$LB_PLAIN"; wait_port "$LB_PROXIED"

measure() { # gateway-name gateway-pid balancer-port connection-pattern round
  local close=0
  [ "$4" = close ] && close=1
  local before after out requests rps cpu_us
  before=$(cpu_ticks "$2")
  out=$(BENCH_CLOSE=$close wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s benches/load/reset.lua "http://127.0.0.1:$3" 2>&1)
  after=$(cpu_ticks "$2")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  if grep -q "Non-2xx" <<<"$out"; then echo "$1: non-2xx answers: $out" >&2; exit 1; fi
  cpu_us=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  printf '%-10s %-8s %-5s %12s %8s\n' "$4" "$1" "$5" "$rps" "$cpu_us" | tee -a "$work/results"
}

# Warm both (upstream pools).
for port in $LB_PLAIN $LB_PROXIED; do wrk -t1 -c8 -d1s -s benches/load/reset.lua "http://127.0.0.1:$port" >/dev/null; done
echo "# $(nproc) cores, wrk -t1 -c$CONNECTIONS -d$DURATION through HAProxy (TCP mode), gateway workers 1, upstream qb-mock"
printf '%-10s %-8s %-5s %12s %8s\n' pattern gateway round "requests/s" cpu_us
for pattern in keepalive close; do
  for round in $(seq "$ROUNDS"); do
    measure plain "$PLAIN_PID" "$LB_PLAIN" "$pattern" "$round"
    measure proxied "$PROXIED_PID" "$LB_PROXIED" "$pattern" "$round"
  done
done
python3 - "$work/results" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
def median(pattern, gateway, column):
    values = sorted(float(r[column]) for r in rows if r[0] == pattern and r[1] == gateway)
    return values[len(values) // 2]
for pattern in ("keepalive", "close"):
    plain, proxied = median(pattern, "plain", 4), median(pattern, "proxied", 4)
    rps_plain, rps_proxied = median(pattern, "plain", 3), median(pattern, "proxied", 3)
    print(f"{pattern}: cpu per request {plain:.2f} us without, {proxied:.2f} us with PROXY v2 "
          f"(ratio {proxied / plain:.3f}); requests/s {rps_plain:.0f} / {rps_proxied:.0f} "
          f"(ratio {rps_proxied / rps_plain:.3f})")
PY
