#!/usr/bin/env bash
# Gateway throughput with the Redis store against the memory store, measured side by side
# in one run with the same load generator, upstream and limits (all four groups active,
# set high enough that nothing is denied). Prints requests/s, latency and the ratio.
#
#   benches/load/store.sh            # 10 s per run, two rounds
#   DURATION=30s ROUNDS=3 benches/load/store.sh
#
# benches/load/store-modes.sh does the same for every store mode (standalone, sentinel,
# cluster) against memory, taking turns, with medians and CPU per request.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-64}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing wrk redis-server
cargo build --release -q -p reset-gateway -p qb-mock

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT


MOCK=$(free_port); REDIS=$(free_port); MEM=$(free_port); RED=$(free_port)
target/release/qb-mock --listen 127.0.0.1:$MOCK --api-key bench-server-key --user user1@example.com >/dev/null & pids+=($!)
redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no --loglevel warning >/dev/null & pids+=($!)
wait_port "$MOCK"; wait_port "$REDIS"

digest=$(printf %s bench-client-token | target/release/reset-gateway hash-token)
config() { # listen, store section
  cat <<YAML
server: { listen: "127.0.0.1:$1" }
admin: { listen: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:$MOCK", timeout: 5s, pool_max_idle: 256 }
guard:
  clients: [{ id: bench, token_sha256: $digest }]
  limits:
    per_ip: [{ requests: 100000000, per: 1s }]
    per_client: [{ requests: 100000000, per: 1s }]
    per_email: [{ requests: 3, per: 1h }, { requests: 10, per: 24h }]
    global: [{ requests: 100000000, per: 1s }]
log: { level: warn }
$2
YAML
}
config "$MEM" "store: { kind: memory }" > "$work/memory.yaml"
# Redis needs a key secret (check-config refuses kind: redis without one).
export RESET_GATEWAY_KEY_SECRET=bench-key-secret-0123456789
config "$RED" "store: { kind: redis, key_secret_env: RESET_GATEWAY_KEY_SECRET, redis: { url: \"redis://127.0.0.1:$REDIS\", timeout: 200ms, on_error: deny } }" > "$work/redis.yaml"
QB_API_KEY=bench-server-key target/release/reset-gateway --config "$work/memory.yaml" 2>"$work/memory.log" & pids+=($!)
QB_API_KEY=bench-server-key target/release/reset-gateway --config "$work/redis.yaml" 2>"$work/redis.log" & pids+=($!)
wait_port "$MEM"; wait_port "$RED"

run() { # name port -> "rps p50 p99"
  local out
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s benches/load/reset.lua "http://127.0.0.1:$2" 2>&1)
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  echo "$rps $p50 $p99 ${non2xx:-0}"
}

# Warm both (connection pools, Redis script cache).
wrk -t1 -c8 -d2s -s benches/load/reset.lua "http://127.0.0.1:$MEM" >/dev/null
wrk -t1 -c8 -d2s -s benches/load/reset.lua "http://127.0.0.1:$RED" >/dev/null

printf '%-8s %-6s %12s %10s %10s %8s\n' store round "requests/s" p50 p99 non-2xx
mem_total=0; red_total=0
for round in $(seq "$ROUNDS"); do
  read -r rps p50 p99 bad < <(run memory "$MEM")
  printf '%-8s %-6s %12s %10s %10s %8s\n' memory "$round" "$rps" "$p50" "$p99" "$bad"
  mem_total=$(python3 -c "print($mem_total + $rps)")
  read -r rps p50 p99 bad < <(run redis "$RED")
  printf '%-8s %-6s %12s %10s %10s %8s\n' redis "$round" "$rps" "$p50" "$p99" "$bad"
  red_total=$(python3 -c "print($red_total + $rps)")
done
python3 -c "print(f'redis/memory throughput ratio: {$red_total / $mem_total:.2f} (target >= 0.6)')"
