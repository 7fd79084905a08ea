#!/usr/bin/env bash
# Gateway throughput with each Redis store mode against the memory store, in one run with
# the same load generator, upstream and limits (all four groups active, set high enough that
# nothing is denied; a new address every request). It starts:
#
#   memory     a gateway with store.kind memory
#   standalone one redis-server, and a gateway with store.redis.mode standalone
#   sentinel   a master, a replica and three sentinels (quorum 2), and a gateway with
#              mode sentinel naming the three sentinels and `mymaster`
#   cluster    three masters joined with `redis-cli --cluster create`, and a gateway with
#              mode cluster given the three as seed nodes
#   cluster-spread
#              the same cluster, and a gateway whose global group is spread over
#              GLOBAL_KEYS keys (store.redis.global_keys, default 3: one per master)
#
# then measures the gateways in rounds, taking turns (the order rotates each round),
# and prints each mode's median requests/s, p50/p99, CPU per request (the gateway's own, and
# that of the Redis processes serving the mode: master and replica and sentinels; the three
# cluster nodes) and its user-space part, how idle the machine stayed (a mode that leaves it
# idle waits rather than works), requests per script call (how well the gateway batches; a
# call's fixed cost in Redis is several requests' worth) and its ratio to memory. Everything
# listens on loopback and is stopped on exit.
#
#   benches/load/store-modes.sh                    # 8 s per run, five rounds: ~4 minutes
#   DURATION=10s ROUNDS=3 benches/load/store-modes.sh
#   GATEWAY_WORKERS=2 benches/load/store-modes.sh  # default 1
#   MODES=cluster CONNECTIONS=256 benches/load/store-modes.sh   # memory and cluster only
#   TREE=/tmp/clean benches/load/store-modes.sh     # build and measure another checkout
#                                                   # (a worktree of a commit), not this one
#   BEFORE=/path/to/older/reset-gateway benches/load/store-modes.sh
#                                                   # that build beside this one, each Redis
#                                                   # mode's gateway run by both ("cluster-before")
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-8s}
ROUNDS=${ROUNDS:-5}
CONNECTIONS=${CONNECTIONS:-64}
GATEWAY_WORKERS=${GATEWAY_WORKERS:-1}
# The modes measured; memory always (the ratios are to it). MODES="cluster" measures
# memory and cluster only.
read -r -a MODES <<<"memory ${MODES:-standalone sentinel cluster cluster-spread}"
GLOBAL_KEYS=${GLOBAL_KEYS:-3}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing wrk redis-server
command -v redis-cli >/dev/null || install_missing redis-tools
TREE=${TREE:-$PWD}
(cd "$TREE" && cargo build --release -q -p reset-gateway -p qb-mock)
bin=$(cd "$TREE" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release

work=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The binaries measured, copied so that a build elsewhere during the run cannot swap them.
cp "$bin/reset-gateway" "$bin/qb-mock" "$work/"
commit=$(git -C "$TREE" rev-parse --short HEAD)
dirty=$(git -C "$TREE" status --porcelain --untracked-files=no | wc -l)

# A loopback port that is free, and whose cluster bus port (+10000) is free as well.
free_cluster_port() {
  python3 -c '
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    if p + 10000 > 65535: a.close(); continue
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 10000))
    except OSError:
        a.close(); continue
    print(p); break'
}

# A redis-server on loopback: port, then extra arguments. Its pid goes to pids and $last_pid.
redis() {
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --protected-mode no \
    --loglevel warning --dir "$work" \
    --repl-diskless-sync yes --repl-diskless-sync-delay 0 "$@" >/dev/null & pids+=($!)
  last_pid=$!
}
# Asks a Redis server on a loopback port one command; prints the reply.
ask() { local port=$1; shift; redis-cli -h 127.0.0.1 -p "$port" "$@"; }
# Waits up to 30 s for a command's reply to match a pattern.
wait_reply() { # port pattern command...
  local port=$1 pattern=$2; shift 2
  for _ in $(seq 300); do
    ask "$port" "$@" 2>/dev/null | grep -q -- "$pattern" && return 0
    sleep 0.1
  done
  echo "redis on $port: '$*' never matched $pattern" >&2
  exit 1
}

MOCK=$(free_port)
"$work/qb-mock" --listen 127.0.0.1:$MOCK --api-key bench-server-key --user user1@example.com >/dev/null & pids+=($!)

# Standalone.
STANDALONE=$(free_port); redis "$STANDALONE"; standalone_pids=$last_pid

# Sentinel: master, replica, three sentinels, each from a config file of its own (Sentinel
# rewrites it).
MASTER=$(free_port); redis "$MASTER"; sentinel_pids=$last_pid
REPLICA=$(free_port); redis "$REPLICA" --replicaof 127.0.0.1 "$MASTER"; sentinel_pids+=" $last_pid"
SENTINELS=()
for i in 1 2 3; do
  port=$(free_port)
  mkdir -p "$work/sentinel$i"
  cat >"$work/sentinel$i/sentinel.conf" <<CONF
port $port
bind 127.0.0.1
protected-mode no
daemonize no
loglevel warning
dir $work/sentinel$i
sentinel monitor mymaster 127.0.0.1 $MASTER 2
sentinel down-after-milliseconds mymaster 5000
sentinel failover-timeout mymaster 60000
CONF
  redis-server "$work/sentinel$i/sentinel.conf" --sentinel >/dev/null & pids+=($!)
  sentinel_pids+=" $!"
  SENTINELS+=("$port")
done

# Cluster: three masters, no replicas.
CLUSTER=()
mkdir -p "$work/cluster"
cluster_pids=""
for i in 1 2 3; do
  port=$(free_cluster_port)
  redis "$port" --cluster-enabled yes --cluster-config-file "$work/cluster/nodes-$port.conf" \
    --cluster-node-timeout 5000
  cluster_pids+=" $last_pid"
  CLUSTER+=("$port")
done

for port in "$MOCK" "$STANDALONE" "$MASTER" "$REPLICA" "${SENTINELS[@]}" "${CLUSTER[@]}"; do wait_port "$port"; done
timeout 60 redis-cli --cluster create "${CLUSTER[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >"$work/cluster-create.log" 2>&1 \
  || { cat "$work/cluster-create.log" >&2; exit 1; }
for port in "${CLUSTER[@]}"; do
  wait_reply "$port" cluster_state:ok CLUSTER INFO
  wait_reply "$port" cluster_slots_ok:16384 CLUSTER INFO
done
wait_reply "$REPLICA" master_link_status:up INFO replication
for port in "${SENTINELS[@]}"; do
  wait_reply "$port" "^$MASTER\$" SENTINEL get-master-addr-by-name mymaster
  wait_reply "$port" "status=ok,address=127.0.0.1:$MASTER,slaves=1,sentinels=3" INFO sentinel
done

# The gateways.
TOKEN=bench-client-token
digest=$(printf %s "$TOKEN" | "$work/reset-gateway" hash-token)
export RESET_GATEWAY_KEY_SECRET=bench-key-secret-0123456789
config() { # listen, store section
  cat <<YAML
server: { listen: "127.0.0.1:$1", workers: $GATEWAY_WORKERS }
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
list() { local sep="" out="" p; for p in "$@"; do out+="$sep\"redis://127.0.0.1:$p\""; sep=", "; done; echo "[$out]"; }
redis_common='key_secret_env: RESET_GATEWAY_KEY_SECRET'
redis_tail='timeout: 200ms, on_error: deny'
declare -A PORT GW_PID STORE_PIDS STORE_PORTS BINARY
STORE_PIDS[memory]=""
STORE_PORTS[memory]=""
STORE_PORTS[standalone]=$STANDALONE
STORE_PORTS[sentinel]="$MASTER $REPLICA"
STORE_PORTS[cluster]=${CLUSTER[*]}
STORE_PORTS[cluster-spread]=${CLUSTER[*]}
STORE_PIDS[standalone]=$standalone_pids
STORE_PIDS[sentinel]=$sentinel_pids
STORE_PIDS[cluster]=$cluster_pids
STORE_PIDS[cluster-spread]=$cluster_pids
if [ -n "${BEFORE:-}" ]; then
  cp "$BEFORE" "$work/reset-gateway-before"
  for mode in "${MODES[@]}"; do
    [ "$mode" = memory ] && continue
    MODES+=("$mode-before")
    STORE_PIDS[$mode-before]=${STORE_PIDS[$mode]}
    STORE_PORTS[$mode-before]=${STORE_PORTS[$mode]}
  done
fi
for mode in "${MODES[@]}"; do PORT[$mode]=$(free_port); done
for mode in "${MODES[@]}"; do
  case $mode in *-before) BINARY[$mode]=$work/reset-gateway-before ;; *) BINARY[$mode]=$work/reset-gateway ;; esac
  case ${mode%-before} in
    memory) store="store: { kind: memory }" ;;
    standalone) store="store: { kind: redis, $redis_common, redis: { mode: standalone, url: \"redis://127.0.0.1:$STANDALONE\", $redis_tail } }" ;;
    sentinel) store="store: { kind: redis, $redis_common, redis: { mode: sentinel, nodes: $(list "${SENTINELS[@]}"), sentinel_master: mymaster, $redis_tail } }" ;;
    cluster) store="store: { kind: redis, $redis_common, redis: { mode: cluster, nodes: $(list "${CLUSTER[@]}"), $redis_tail } }" ;;
    cluster-spread) store="store: { kind: redis, $redis_common, redis: { mode: cluster, nodes: $(list "${CLUSTER[@]}"), global_keys: $GLOBAL_KEYS, $redis_tail } }" ;;
    *) echo "store-modes.sh: unknown mode '$mode' in MODES (standalone, sentinel, cluster, cluster-spread)" >&2; exit 1 ;;
  esac
  config "${PORT[$mode]}" "$store" >"$work/$mode.yaml"
done
checked=()
for mode in "${MODES[@]}"; do
  if ! QB_API_KEY=bench-server-key "${BINARY[$mode]}" check-config --config "$work/$mode.yaml" >/dev/null 2>"$work/$mode.check"; then
    # A build from before a mode's setting existed (cluster-spread's global_keys) is left
    # out of that mode.
    case $mode in
      *-before) echo "$mode: left out, the build before refuses its config: $(cat "$work/$mode.check")" >&2; continue ;;
      *) echo "$mode: config refused:" >&2; cat "$work/$mode.check" >&2; exit 1 ;;
    esac
  fi
  checked+=("$mode")
done
MODES=("${checked[@]}")
for mode in "${MODES[@]}"; do
  QB_API_KEY=bench-server-key "${BINARY[$mode]}" --config "$work/$mode.yaml" 2>"$work/$mode.log" & pids+=($!)
  GW_PID[$mode]=$!
done
for mode in "${MODES[@]}"; do wait_port "${PORT[$mode]}"; done

# CPU time of the given processes so far, in clock ticks: user and system, then user only.
cpu_ticks() { local total=0 pid; for pid in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done; echo "$total"; }
user_ticks() { local total=0 pid; for pid in "$@"; do total=$((total + $(awk '{print $14}' "/proc/$pid/stat"))); done; echo "$total"; }
# The whole machine's CPU time so far, in clock ticks: all of it, and idle (idle + iowait).
machine_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6}' /proc/stat; }

# Script calls (EVALSHA) the given Redis servers have run so far, less those that failed (a
# call refused NOSCRIPT is sent again once the script is loaded).
script_calls() {
  local total=0 port n
  for port in "$@"; do
    n=$(ask "$port" INFO commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_evalsha:/ {
      for (i = 2; i < NF; i += 2) v[$i] = $(i + 1); print v["calls"] - v["failed_calls"] }')
    total=$((total + ${n:-0}))
  done
  echo "$total"
}

measure() { # mode round -> one line
  local port=${PORT[$1]} out gw_before gw_after st_before st_after calls_before calls_after
  local gwu_before gwu_after stu_before stu_after box_before box_after
  BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c8 -d1s -s benches/load/reset.lua "http://127.0.0.1:$port" >/dev/null 2>&1 || true
  gw_before=$(cpu_ticks "${GW_PID[$1]}")
  gwu_before=$(user_ticks "${GW_PID[$1]}")
  # shellcheck disable=SC2086
  st_before=$(cpu_ticks ${STORE_PIDS[$1]})
  # shellcheck disable=SC2086
  stu_before=$(user_ticks ${STORE_PIDS[$1]})
  box_before=$(machine_ticks)
  # shellcheck disable=SC2086
  calls_before=$(script_calls ${STORE_PORTS[$1]})
  out=$(BENCH_CLIENT_TOKEN=$TOKEN timeout 120 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s benches/load/reset.lua "http://127.0.0.1:$port" 2>&1)
  box_after=$(machine_ticks)
  gw_after=$(cpu_ticks "${GW_PID[$1]}")
  gwu_after=$(user_ticks "${GW_PID[$1]}")
  # shellcheck disable=SC2086
  st_after=$(cpu_ticks ${STORE_PIDS[$1]})
  # shellcheck disable=SC2086
  stu_after=$(user_ticks ${STORE_PIDS[$1]})
  # shellcheck disable=SC2086
  calls_after=$(script_calls ${STORE_PORTS[$1]})
  local rps p50 p99 non2xx errors requests hz gw_us st_us gw_user st_user idle per_call
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  errors=$(awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  hz=$(getconf CLK_TCK)
  gw_us=$(awk -v t=$((gw_after - gw_before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  st_us=$(awk -v t=$((st_after - st_before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  gw_user=$(awk -v t=$((gwu_after - gwu_before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  st_user=$(awk -v t=$((stu_after - stu_before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  idle=$(awk -v b="$box_before" -v a="$box_after" 'BEGIN {split(b, x, " "); split(a, y, " "); t = y[1] - x[1]; printf "%.1f", (t > 0 ? 100 * (y[2] - x[2]) / t : 0)}')
  per_call=$(awk -v c=$((calls_after - calls_before)) -v n="$requests" 'BEGIN {if (c > 0) printf "%.1f", n / c; else print "-"}')
  printf '%-17s %-5s %12s %10s %10s %8s %8s %8s %8s %8s %8s %6s %9s\n' "$1" "$2" "$rps" "$p50" "$p99" "${non2xx:-0}" "${errors:-0}" "$gw_us" "$gw_user" "$st_us" "$st_user" "$idle" "$per_call"
}

# Warm every gateway (connection pools, Redis script caches, the cluster's slot map).
for mode in "${MODES[@]}"; do
  BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c8 -d2s -s benches/load/reset.lua "http://127.0.0.1:${PORT[$mode]}" >/dev/null
done

results=$work/results.txt
{
  echo "# $(date -u +%FT%TZ) $(nproc) cores, commit $commit$([ "$dirty" -gt 0 ] && echo " (+$dirty uncommitted tracked files)"), wrk -t1 -c$CONNECTIONS -d$DURATION, $ROUNDS round(s), gateway workers $GATEWAY_WORKERS, redis $(redis-server --version | awk '{print $3}')"
  echo "# gw_us: the gateway's CPU per request (gw_user: the user-space part of it); store_us, store_user: its"
  echo "# Redis processes' (none for memory); idle: the machine's idle share (%); per_call: requests per script call"
  printf '%-17s %-5s %12s %10s %10s %8s %8s %8s %8s %8s %8s %6s %9s\n' mode round "requests/s" p50 p99 non-2xx errors gw_us gw_user store_us st_user idle per_call
} | tee "$results"
for round in $(seq "$ROUNDS"); do
  # Rotate the order so that no mode always runs first or last.
  for i in "${!MODES[@]}"; do
    mode=${MODES[$(( (i + round - 1) % ${#MODES[@]} ))]}
    measure "$mode" "$round" | tee -a "$results"
  done
done

python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    if line.startswith('#') or line.startswith('mode'):
        continue
    mode, rnd, rps, p50, p99, bad, err, gw, gw_user, st, st_user, idle, per_call = line.split()
    rows.setdefault(mode, []).append(dict(round=int(rnd), rps=float(rps), p50=p50, p99=p99,
                                          bad=int(bad), err=int(err), gw=float(gw), st=float(st),
                                          gw_user=float(gw_user), st_user=float(st_user),
                                          idle=float(idle),
                                          per_call=None if per_call == '-' else float(per_call)))
def median_row(rs):
    return sorted(rs, key=lambda r: r['rps'])[len(rs) // 2]
mem = statistics.median(r['rps'] for r in rows['memory'])
mem_by_round = {r['round']: r['rps'] for r in rows['memory']}
print()
print(f"{'mode':<17} {'requests/s':>11} {'p50':>9} {'p99':>9} {'gw us/req (user)':>17} {'store us/req (user)':>20} {'idle %':>7} {'req/call':>9} {'ratio':>6} {'paired':>7}  per-round ratios")
for mode in rows:
    rs = rows[mode]
    rps = statistics.median(r['rps'] for r in rs)
    m = median_row(rs)
    gw = statistics.median(r['gw'] for r in rs)
    st = statistics.median(r['st'] for r in rs)
    gw_user = statistics.median(r['gw_user'] for r in rs)
    st_user = statistics.median(r['st_user'] for r in rs)
    idle = statistics.median(r['idle'] for r in rs)
    calls = [r['per_call'] for r in rs if r['per_call'] is not None]
    per_call = f"{statistics.median(calls):9.1f}" if calls else f"{'-':>9}"
    ratios = [r['rps'] / mem_by_round[r['round']] for r in sorted(rs, key=lambda r: r['round'])]
    per_round = ' '.join(f"{x:.2f}" for x in ratios)
    paired = statistics.median(ratios)
    bad = sum(r['bad'] + r['err'] for r in rs)
    note = '' if bad == 0 else f'  ({bad} non-2xx or socket errors!)'
    print(f"{mode:<17} {rps:11.0f} {m['p50']:>9} {m['p99']:>9} {gw:9.2f} ({gw_user:5.2f}) {st:12.2f} ({st_user:5.2f}) {idle:7.1f} {per_call} {rps / mem:6.2f} {paired:7.2f}  {per_round}{note}")
print()
print("ratio: median requests/s over memory's median; paired: median of the per-round ratios (each")
print("round's requests/s over memory's in the same round, so less moved by load that drifts over the")
print("run); target >= 0.6")
PY
