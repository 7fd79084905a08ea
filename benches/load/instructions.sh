#!/usr/bin/env bash
# The gateway's own work per request, counted in instructions: it runs under valgrind's
# callgrind (user space only, so the kernel's TCP work is not in it) while wrk sends
# resets through it, first ones that are forwarded (allow), then a flood answered 429.
# Unlike requests/s on a shared machine, the count moves by well under 1% between runs,
# which makes it the figure to compare two versions of the code by.
#
#   benches/load/instructions.sh                       # the current tree
#   BIN=/path/to/other/reset-gateway benches/load/instructions.sh
#   LEVEL=info benches/load/instructions.sh            # with the access log (the default level)
#   KEEP=/tmp/cg benches/load/instructions.sh          # keep callgrind's output files there
#   NGINX=1 benches/load/instructions.sh               # also nginx doing the same job
#                                                      # (configs/nginx.conf.in, one process),
#                                                      # with an access log when the gateway
#                                                      # writes one (any level, warn too)
#   NGINX=1 LEVEL=warn,access=off benches/load/instructions.sh
#                                                      # neither writes an access log
#   STORE="redis cluster" benches/load/instructions.sh # forwarded resets with every group on,
#                                                      # the memory store against a Redis
#                                                      # server and a three-master cluster it
#                                                      # starts (the gateway's side only);
#                                                      # cluster-spread: the same cluster
#                                                      # with global_keys: 3
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
DURATION=${DURATION:-6s}
LEVEL=${LEVEL:-warn}
KEEP=${KEEP:-}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing wrk valgrind
NGINX=${NGINX:-}
STORE=${STORE:-}
[ -n "$STORE" ] && install_missing redis-server
[ -n "$NGINX" ] && install_missing nginx
cargo build --release -q -p reset-gateway -p qb-mock
bin=$root/target/release
BIN=${BIN:-$bin/reset-gateway}

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
"$bin/qb-mock" --listen 127.0.0.1:$MOCK --api-key $KEY --all-users >/dev/null & pids+=($!)
wait_port "$MOCK"
DIGEST=$(printf %s $TOKEN | "$bin/reset-gateway" hash-token)
cat > "$work/flood.lua" <<LUA
request = function()
  return wrk.format("GET", "/users/password/reset.json?email=victim%40example.com", { ["QB-Token"] = "$TOKEN" })
end
LUA

count() { # scenario [store section] -> one line
  local per_ip per_email script=benches/load/reset.lua per_client="[]" global="[]" store=${2:-}
  if [ "$1" = allow ]; then
    per_ip="[{ requests: 100000000, per: 1s }]"; per_email="[{ requests: 100000000, per: 1s }]"
  elif [ "$1" = flood ]; then
    per_ip="[{ requests: 20, per: 1m }]"; per_email="[{ requests: 3, per: 1h }]"; script=$work/flood.lua
  else
    # The load of store-modes.sh: every group on, nothing denied.
    per_ip="[{ requests: 100000000, per: 1s }]"; per_client=$per_ip; global=$per_ip
    per_email="[{ requests: 3, per: 1h }, { requests: 10, per: 24h }]"
  fi
  local gw
  gw=$(free_port)
  cat > "$work/gateway.yaml" <<YAML
server: { listen: "127.0.0.1:$gw", workers: 1 }
admin: { listen: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:$MOCK" }
guard:
  clients: [{ id: bench, token_sha256: $DIGEST }]
  limits: { per_ip: $per_ip, per_client: $per_client, per_email: $per_email, global: $global }
log: { level: "$LEVEL" }
$store
YAML
  rm -f "$work"/callgrind.out*
  QB_API_KEY=$KEY RESET_GATEWAY_KEY_SECRET=bench-key-secret-0123456789 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out" \
    "$BIN" --config "$work/gateway.yaml" 2>"$work/valgrind.log" &
  local vg=$!
  pids+=($vg)
  wait_port "$gw"
  # Warm up (connections, pools, maps), then count only the measured requests.
  BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c4 -d2s -s "$script" "http://127.0.0.1:$gw" >/dev/null
  callgrind_control -i on "$vg" >/dev/null 2>&1
  local out
  out=$(BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c4 -d"$DURATION" -s "$script" "http://127.0.0.1:$gw")
  callgrind_control -i off "$vg" >/dev/null 2>&1
  callgrind_control -d "$vg" >/dev/null 2>&1
  kill "$vg" 2>/dev/null || true
  wait "$vg" 2>/dev/null || true
  local requests total
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  total=$(awk '/^totals:/ {print $2}' "$work"/callgrind.out* | sort -n | tail -1)
  printf '%-6s %8d requests %10d instructions/request\n' "$1" "$requests" $((total / requests))
  if [ -n "$KEEP" ]; then
    mkdir -p "$KEEP"
    for f in "$work"/callgrind.out*; do cp "$f" "$KEEP/$1.$requests.$(basename "$f")"; done
  fi
}

# nginx under the same count: the load script's config, as one process (no master, no
# daemon) so that callgrind follows the process that serves. It writes an access log (its
# default format, buffered as the gateway's sink is) whenever the gateway does: at any
# LEVEL that does not say `access=off`, warn included.
count_nginx() { # scenario -> one line
  local script=benches/load/reset.lua port static ip_rate ip_burst email_rate email_burst
  local access_log="access_log off;" logged="no access log"
  if [[ $LEVEL != *access=off* ]]; then
    access_log="access_log $work/nginx-access.log combined buffer=64k;" logged="access log"
  fi
  if [ "$1" = allow ]; then
    ip_rate=1000000r/s; ip_burst=1000000; email_rate=1000000r/s; email_burst=1000000
  else
    ip_rate=20r/m; ip_burst=20; email_rate=1r/m; email_burst=3; script=$work/flood.lua
  fi
  port=$(free_port); static=$(free_port)
  sed -e "s|@WORK@|$work|g" -e "s|@PORT@|$port|g" -e "s|@STATIC_PORT@|$static|g" -e "s|@UPSTREAM@|$MOCK|g" \
    -e "s|@TOKEN@|$TOKEN|g" -e "s|@API_KEY@|$KEY|g" -e "s|@PER_IP_RATE@|$ip_rate|g" -e "s|@PER_IP_BURST@|$ip_burst|g" \
    -e "s|@PER_EMAIL_RATE@|$email_rate|g" -e "s|@PER_EMAIL_BURST@|$email_burst|g" \
    -e "s|^worker_processes 2;|worker_processes 1; master_process off; daemon off;|" \
    -e "s|^    access_log off;|    $access_log|" \
    benches/load/configs/nginx.conf.in > "$work/nginx.conf"
  grep -qF "    $access_log" "$work/nginx.conf"
  rm -f "$work"/callgrind.out*
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out" \
    nginx -c "$work/nginx.conf" -e "$work/nginx-error.log" 2>"$work/valgrind.log" &
  local vg=$!
  pids+=($vg)
  wait_port "$port"
  BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c4 -d2s -s "$script" "http://127.0.0.1:$port" >/dev/null
  callgrind_control -i on "$vg" >/dev/null 2>&1
  local out
  out=$(BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c4 -d"$DURATION" -s "$script" "http://127.0.0.1:$port")
  callgrind_control -i off "$vg" >/dev/null 2>&1
  callgrind_control -d "$vg" >/dev/null 2>&1
  kill "$vg" 2>/dev/null || true
  wait "$vg" 2>/dev/null || true
  local requests total
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  total=$(awk '/^totals:/ {print $2}' "$work"/callgrind.out* | sort -n | tail -1)
  printf '%-6s %8d requests %10d instructions/request (nginx, %s)\n' "$1" "$requests" $((total / requests)) "$logged"
  if [ -n "$KEEP" ]; then
    for f in "$work"/callgrind.out*; do cp "$f" "$KEEP/nginx-$1.$requests.$(basename "$f")"; done
  fi
}

echo "# $(basename "$BIN"): user-space instructions per request, one worker, log level $LEVEL (callgrind)"
if [ -n "$STORE" ]; then
  redis_at() { # port, extra arguments
    local port=$1; shift
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" "$@" >/dev/null & pids+=($!)
  }
  common='kind: redis, key_secret_env: RESET_GATEWAY_KEY_SECRET'
  # Three masters joined by redis-cli, once for every cluster mode: sets cluster_list.
  start_cluster() {
    local nodes=() i port list
    for i in 1 2 3; do
      port=$(python3 -c 'import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    if p + 10000 > 65535: continue
    b = socket.socket()
    try: b.bind(("127.0.0.1", p + 10000))
    except OSError: continue
    print(p); break')
      redis_at "$port" --cluster-enabled yes --cluster-config-file "$work/nodes-$port.conf"
      nodes+=("$port")
    done
    for port in "${nodes[@]}"; do wait_port "$port"; done
    redis-cli --cluster create "${nodes[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 100); do
      redis-cli -p "${nodes[0]}" cluster info | grep -q cluster_state:ok && break
      sleep 0.1
    done
    list=$(printf '"redis://127.0.0.1:%s", ' "${nodes[@]}")
    cluster_list=${list%, }
  }
  count stores "store: { kind: memory }"
  for mode in $STORE; do
    case $mode in
      redis)
        port=$(free_port); redis_at "$port"; wait_port "$port"
        count "$mode" "store: { $common, redis: { url: \"redis://127.0.0.1:$port\", timeout: 5s } }" ;;
      cluster | cluster-spread)
        [ -n "${cluster_list:-}" ] || start_cluster
        spread=""
        [ "$mode" = cluster-spread ] && spread="global_keys: 3, "
        count "$mode" "store: { $common, redis: { mode: cluster, nodes: [$cluster_list], ${spread}timeout: 5s } }" ;;
      *) echo "instructions.sh: unknown STORE mode '$mode' (redis, cluster, cluster-spread)" >&2; exit 1 ;;
    esac
  done
  exit 0
fi
count allow
count flood
if [ -n "$NGINX" ]; then
  count_nginx allow
  count_nginx flood
fi
