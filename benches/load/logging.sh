#!/usr/bin/env bash
# What logging costs the gateway, with its logs on: one run, one load generator (wrk, one
# thread, 64 connections), qb-mock upstream, one gateway worker.
#
#   flood   one address from one IP (every request after the third a 429) against the
#           gateway at log level warn (no access log), at info with log.denials: summarize
#           (the default) and at info with log.denials: full. Prints requests/s, the
#           throughput ratio to warn and the log bytes written per request.
#   stalled allowed resets (a new address each, all forwarded) with the gateway's stderr on
#           a pipe whose reader takes 1 KB a second: requests/s and p99, beside the same
#           gateway logging to a file.
#
# BEFORE=path/to/reset-gateway measures another build beside this one (its rows are
# labelled before-…); a build without log.denials runs the `summarize` and `full` rows as
# plain `info`.
#
#   benches/load/logging.sh                 # 8 s per measurement, ~1 minute
#   DURATION=10s BEFORE=/tmp/old/reset-gateway benches/load/logging.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-64}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing wrk
cargo build --release -q -p reset-gateway -p qb-mock
bin=$root/target/release

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

TOKEN=bench-client-token
KEY=bench-server-key
MOCK=$(free_port)
"$bin/qb-mock" --listen 127.0.0.1:$MOCK --api-key $KEY --all-users >/dev/null &
pids+=($!)
wait_port "$MOCK"
DIGEST=$(printf %s $TOKEN | "$bin/reset-gateway" hash-token)

cat > "$work/flood.lua" <<LUA
request = function()
  return wrk.format("GET", "/users/password/reset.json?email=victim%40example.com", { ["QB-Token"] = "$TOKEN" })
end
LUA

# A reader that takes 1 KB a second, like a stalled log shipper.
cat > "$work/slow_reader.py" <<'PY'
import sys, time
while sys.stdin.buffer.read(1024):
    time.sleep(1)
PY

config() { # port level log-extra limits -> gateway.yaml
  cat > "$work/gateway.yaml" <<YAML
server: { listen: "127.0.0.1:$1", workers: 1 }
admin: { listen: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:$MOCK", pool_max_idle: 128 }
guard:
  clients: [{ id: bench, token_sha256: $DIGEST }]
  limits: $4
log: { level: $2$3 }
YAML
}

FLOOD_LIMITS='{ per_ip: [], per_client: [], per_email: [{ requests: 3, per: 1h }], global: [] }'
OPEN_LIMITS='{ per_ip: [], per_client: [], per_email: [], global: [] }'

# run label binary level log-extra limits script sink -> one result line
run() {
  local label=$1 gw=$2 level=$3 extra=$4 limits=$5 script=$6 sink=$7 port out rps p99 requests bytes
  port=$(free_port)
  config "$port" "$level" "$extra" "$limits"
  local reader=
  if [ "$sink" = slow ]; then
    rm -f "$work/log.fifo"; mkfifo "$work/log.fifo"
    python3 "$work/slow_reader.py" < "$work/log.fifo" & reader=$!
    pids+=($reader)
    QB_API_KEY=$KEY "$gw" --config "$work/gateway.yaml" 2>"$work/log.fifo" &
  else
    QB_API_KEY=$KEY "$gw" --config "$work/gateway.yaml" 2>"$work/gateway.log" &
  fi
  local pid=$!
  pids+=($pid)
  wait_port "$port"
  local before
  before=$(stat -c %s "$work/gateway.log" 2>/dev/null || echo 0)
  out=$(BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$script" "http://127.0.0.1:$port" 2>&1)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  [ -n "$reader" ] && { kill "$reader"; wait "$reader" 2>/dev/null || true; }
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  bytes=0
  [ "$sink" = file ] && bytes=$(( $(stat -c %s "$work/gateway.log") - before ))
  printf '%-26s %12s %10s %12s %10.2f\n' "$label" "${rps:-0}" "${p99:--}" "${requests:-0}" \
    "$(awk -v b="$bytes" -v n="${requests:-0}" 'BEGIN {print n ? b / n : 0}')"
}

results=$work/results.txt
{
  echo "# $(date -u +%FT%TZ) $(nproc) cores, wrk -t1 -c$CONNECTIONS -d$DURATION, upstream qb-mock, one gateway worker"
  printf '%-26s %12s %10s %12s %10s\n' run "requests/s" p99 requests "log B/req"
} > "$results"
builds=("now:$bin/reset-gateway")
[ -n "${BEFORE:-}" ] && builds+=("before:$BEFORE")
for build in "${builds[@]}"; do
  name=${build%%:*} gw=${build#*:}
  if [ "$name" = now ]; then summarize=', denials: summarize'; full=', denials: full'; else summarize=''; full=''; fi
  run "$name flood warn" "$gw" warn '' "$FLOOD_LIMITS" "$work/flood.lua" file >> "$results"
  run "$name flood info summarize" "$gw" info "$summarize" "$FLOOD_LIMITS" "$work/flood.lua" file >> "$results"
  [ "$name" = now ] && run "$name flood info full" "$gw" info "$full" "$FLOOD_LIMITS" "$work/flood.lua" file >> "$results"
  run "$name forward file" "$gw" info '' "$OPEN_LIMITS" benches/load/reset.lua file >> "$results"
  run "$name forward stalled" "$gw" info '' "$OPEN_LIMITS" benches/load/reset.lua slow >> "$results"
done
python3 - "$results" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    words = line.split()
    if line.startswith('#') or len(words) < 5 or words[0] not in ('now', 'before'):
        continue
    *label, rps, p99, n, b = words
    rows[' '.join(label)] = (float(rps), p99, int(n), float(b))
print(open(sys.argv[1]).read(), end='')
for build in ['now', 'before']:
    warn = rows.get(f'{build} flood warn')
    if not warn:
        continue
    for mode in ['summarize', 'full']:
        r = rows.get(f'{build} flood info {mode}')
        if r:
            print(f'{build}: flood at info ({mode}) / warn throughput {r[0]/warn[0]:.2f} (target >= 0.9), '
                  f'{r[3]:.2f} log bytes per request (target <= 5)')
    f, s = rows[f'{build} forward file'], rows[f'{build} forward stalled']
    print(f'{build}: forwarded with a stalled log reader / with a log file: throughput {s[0]/f[0]:.2f}, p99 {s[1]} vs {f[1]}')
PY
