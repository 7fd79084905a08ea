#!/usr/bin/env bash
# What the rate-limit script costs Redis, in instructions per request decided: redis-server
# runs under valgrind's callgrind while redis-benchmark sends the same kind of script call
# the gateway makes (BATCH requests per call, each charging the shipped limits' four groups
# and five quotas, new per-IP and per-email keys each time, the client and global keys
# shared). Unlike CPU time on a shared machine, the count moves by about 1-2% between runs
# (the keys are random), so it is the figure to compare two versions of the script by.
#
#   benches/load/redis-script.sh                          # this tree's script
#   SCRIPT=/path/to/other/redis.lua benches/load/redis-script.sh
#   BATCH=64 CALLS=100 benches/load/redis-script.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SCRIPT=${SCRIPT:-crates/reset-guard/src/limit/redis.lua}
BATCH=${BATCH:-16}
CALLS=${CALLS:-300}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing valgrind redis-server
command -v redis-benchmark >/dev/null || install_missing redis-tools

work=$(mktemp -d)
vg=
cleanup() {
  [ -n "$vg" ] && kill "$vg" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port=$(free_port)
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
  redis-server --port "$port" --save '' --appendonly no >"$work/redis.log" 2>&1 &
vg=$!
for _ in $(seq 300); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
sha=$(redis-cli -p "$port" script load "$(cat "$SCRIPT")")

# The shipped limits (config/gateway.yaml), as the gateway passes them: per quota
# interval_us, capacity_us and shadow, per group its quota count first.
sets=(1 3000000 60000000 0 1 5000 2000000 0 2 1200000000 3600000000 0 8640000000 86400000000 0 1 10000 1000000 0)
keys=() requests=()
for _ in $(seq "$BATCH"); do
  keys+=(rg:per_ip:3000000.60000000:__rand_int__ rg:per_client:5000.2000000:0000000000000001
    rg:per_email:1200000000.3600000000:__rand_int__ rg:per_email:8640000000.86400000000:__rand_int__
    rg:global:10000.1000000:0000000000000000)
  requests+=(4 1 2 3 4)
done
# One call to warm the script cache, then count only the measured calls.
redis-cli -p "$port" evalsha "$sha" ${#keys[@]} "${keys[@]//__rand_int__/0}" "$BATCH" 4 0 "${sets[@]}" "${requests[@]}" >/dev/null
callgrind_control -z "$vg" >/dev/null 2>&1
redis-benchmark -p "$port" -n "$CALLS" -c 1 -r 1000000000 \
  evalsha "$sha" ${#keys[@]} "${keys[@]}" "$BATCH" 4 0 "${sets[@]}" "${requests[@]}" >/dev/null
callgrind_control -d "$vg" >/dev/null 2>&1
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
wait "$vg" 2>/dev/null || true
vg=
total=$(awk '/^totals:/ {print $2}' "$work"/callgrind.out* | sort -n | tail -1)
printf '%s: %d calls of %d requests, %d instructions per request in redis-server\n' \
  "$SCRIPT" "$CALLS" "$BATCH" $((total / (CALLS * BATCH)))
