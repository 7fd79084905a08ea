#!/usr/bin/env bash
# The comparison users make: this gateway against nginx and HAProxy configured to do the
# same job, and against QuickBlox's stand-in reached directly. One run, one load generator
# (wrk, one thread, 64 connections), one upstream (qb-mock in its own process).
#
# Scenarios:
#   allow  limits high enough that nothing is denied; a new address every request
#   flood  one address from one IP: after the first few, every request is denied (429)
#
# Prints requests/s, p50, p99 and CPU time per request for each, the gateway/nginx and
# gateway/direct ratios, the gateway's idle and peak RSS, and writes results.txt and
# chart.svg beside this script. The flood also measures a ceiling: nginx answering a fixed
# 429 with no checks, the most any server can be driven to here.
#
# The gateway runs with its default settings (`workers` one per core, log level info).
# GATEWAY sets other variants, each a gateway process of its own measured in the same
# rounds: a space-separated list of WORKERS:LEVEL[:BINARY], WORKERS a number or `default`,
# LEVEL a log level or `default`, BINARY another build to run (a before/after comparison in
# one run); the first is the one the ratios are taken from, e.g.
#   GATEWAY="default:default 1:default 2:warn default:default:/tmp/old/reset-gateway" benches/load/run.sh
#
# Each server is measured ROUNDS times (default 3), the servers taking turns, and the
# median round is reported: shared 2-core machines are noisy.
#
#   benches/load/run.sh                 # 10 s per measurement
#   DURATION=30s ROUNDS=5 benches/load/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
GATEWAY=${GATEWAY:-default:default}
read -r -a variants <<<"$GATEWAY"
OUT=${OUT:-$root/benches/load}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing wrk nginx haproxy
cargo build --release -q -p reset-gateway -p qb-mock
bin=$root/target/release

work=$(mktemp -d)
pids=()
cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ -f "$work/haproxy.pid" ] && kill "$(cat "$work/haproxy.pid")" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
rss_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
# CPU time of the given processes so far, in clock ticks: user and system, then user only.
cpu_ticks() { local total=0 user=0 pid; for pid in "$@"; do read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat"); total=$((total + u + s)); user=$((user + u)); done; echo "$total $user"; }

TOKEN=bench-client-token
KEY=bench-server-key
MOCK=$(free_port)
# Every address is a registered user: answers are 200, as for real accounts, so no proxy
# pays for intercepting a 404 (nginx closes the upstream connection when it does).
"$bin/qb-mock" --listen 127.0.0.1:$MOCK --api-key $KEY --all-users >/dev/null & MOCK_PID=$!
pids+=($MOCK_PID)
wait_port "$MOCK"
DIGEST=$(printf %s $TOKEN | "$bin/reset-gateway" hash-token)

# Per scenario: the gateway's limits, and the same numbers for nginx and HAProxy.
start_all() { # scenario -> sets GW_PORTS GW_PIDS NGINX HAPROXY STATIC
  local scenario=$1
  local per_ip per_email
  if [ "$scenario" = allow ]; then
    per_ip="[{ requests: 100000000, per: 1s }]"; per_email="[{ requests: 100000000, per: 1s }]"
    nginx_ip_rate=1000000r/s; nginx_ip_burst=1000000; nginx_email_rate=1000000r/s; nginx_email_burst=1000000
    ha_ip_window=1s; ha_ip_limit=100000000; ha_email_window=1s; ha_email_limit=100000000
  else
    per_ip="[{ requests: 20, per: 1m }]"; per_email="[{ requests: 3, per: 1h }]"
    nginx_ip_rate=20r/m; nginx_ip_burst=20; nginx_email_rate=1r/m; nginx_email_burst=3  # nginx has no r/h: the closest it can say
    ha_ip_window=1m; ha_ip_limit=20; ha_email_window=1h; ha_email_limit=3
  fi
  NGINX=$(free_port); HAPROXY=$(free_port); STATIC=$(free_port)
  GW_PORTS=(); GW_PIDS=()
  local variant workers level binary i=0
  for variant in "${variants[@]}"; do
    IFS=: read -r workers level binary <<<"$variant"
    local port
    port=$(free_port)
    {
      if [ "$workers" = default ]; then echo "server: { listen: \"127.0.0.1:$port\" }"; else echo "server: { listen: \"127.0.0.1:$port\", workers: $workers }"; fi
      cat <<YAML
admin: { listen: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:$MOCK", pool_max_idle: 128 }
guard:
  clients: [{ id: bench, token_sha256: $DIGEST }]
  limits: { per_ip: $per_ip, per_client: [], per_email: $per_email, global: [] }
YAML
      [ "$level" = default ] || echo "log: { level: $level }"
    } > "$work/gateway-$i.yaml"
    # The access log goes where an operator's would: a file.
    QB_API_KEY=$KEY "${binary:-$bin/reset-gateway}" --config "$work/gateway-$i.yaml" 2>"$work/gateway-$i.log" &
    GW_PIDS+=($!); GW_PORTS+=("$port"); pids+=($!)
    i=$((i + 1))
  done
  GW_PID=${GW_PIDS[0]}
  fill() {
    sed -e "s|@WORK@|$work|g" -e "s|@PORT@|$1|g" -e "s|@STATIC_PORT@|$STATIC|g" -e "s|@UPSTREAM@|$MOCK|g" -e "s|@TOKEN@|$TOKEN|g" -e "s|@API_KEY@|$KEY|g" \
      -e "s|@PER_IP_RATE@|$nginx_ip_rate|g" -e "s|@PER_IP_BURST@|$nginx_ip_burst|g" \
      -e "s|@PER_EMAIL_RATE@|$nginx_email_rate|g" -e "s|@PER_EMAIL_BURST@|$nginx_email_burst|g" \
      -e "s|@PER_IP_WINDOW@|$ha_ip_window|g" -e "s|@PER_IP_LIMIT@|$ha_ip_limit|g" \
      -e "s|@PER_EMAIL_WINDOW@|$ha_email_window|g" -e "s|@PER_EMAIL_LIMIT@|$ha_email_limit|g" "$2"
  }
  fill "$NGINX" benches/load/configs/nginx.conf.in > "$work/nginx.conf"
  fill "$HAPROXY" benches/load/configs/haproxy.cfg.in > "$work/haproxy.cfg"
  nginx -c "$work/nginx.conf" -e "$work/nginx-error.log"
  haproxy -D -f "$work/haproxy.cfg" 2>"$work/haproxy.log" || { cat "$work/haproxy.log" >&2; exit 1; }
  for p in "${GW_PORTS[@]}" $NGINX $HAPROXY $STATIC; do wait_port "$p"; done
}
stop_all() {
  local p
  for p in "${GW_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  kill "$(cat "$work/haproxy.pid")" 2>/dev/null || true
  sleep 0.5
}

cat > "$work/flood.lua" <<LUA
request = function()
  return wrk.format("GET", "/users/password/reset.json?email=victim%40example.com", { ["QB-Token"] = "$TOKEN" })
end
LUA

server_pids() { # name -> the processes doing that server's work (not the shared upstream's)
  case $1 in
    direct) echo "$MOCK_PID" ;;
    gateway) echo "${GW_PIDS[0]}" ;;
    gw-*) echo "${GW_PIDS[${1#gw-}]}" ;;
    nginx | static) pgrep -f "nginx: worker process" | tr '\n' ' ' ;;
    haproxy) cat "$work/haproxy.pid" ;;
  esac
}

measure() { # scenario name port round -> one line
  local script=benches/load/reset.lua
  [ "$1" = flood ] && script=$work/flood.lua
  BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c8 -d1s -s "$script" "http://127.0.0.1:$3" >/dev/null 2>&1 || true
  local out pids before before_user after after_user
  pids=$(server_pids "$2")
  # shellcheck disable=SC2086
  read -r before before_user < <(cpu_ticks $pids)
  out=$(BENCH_CLIENT_TOKEN=$TOKEN wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$script" "http://127.0.0.1:$3" 2>&1)
  # shellcheck disable=SC2086
  read -r after after_user < <(cpu_ticks $pids)
  local rps p50 p99 non2xx requests cpu_us user_us
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu_us=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  user_us=$(awk -v t=$((after_user - before_user)) -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  printf '%-6s %-10s %-5s %12s %10s %10s %10s %8s %8s\n' "$1" "$2" "$4" "$rps" "$p50" "$p99" "${non2xx:-0}" "$cpu_us" "$user_us"
}

results=$work/results.txt
{
  echo "# $(date -u +%FT%TZ) $(nproc) cores, wrk -t1 -c$CONNECTIONS -d$DURATION, upstream qb-mock, gateway variants (workers:level) $GATEWAY"
  echo "# cpu_us: CPU time of the server's own processes per request (the upstream's not included);"
  echo "# user_us: the part of it in user space (the rest is the kernel's: sockets, TCP, and on"
  echo "# loopback the receiving side's TCP work too)"
  for i in "${!variants[@]}"; do [ "$i" = 0 ] && echo "# gateway: ${variants[0]}" || echo "# gw-$i: ${variants[$i]}"; done
  printf '%-6s %-10s %-5s %12s %10s %10s %10s %8s %8s\n' scenario server round "requests/s" p50 p99 non-2xx cpu_us user_us
} > "$results"
for scenario in allow flood; do
  start_all "$scenario"
  idle_rss=$(rss_kib "$GW_PID" VmRSS)
  for round in $(seq "$ROUNDS"); do
    [ "$scenario" = allow ] && measure "$scenario" direct "$MOCK" "$round" >> "$results"
    measure "$scenario" gateway "${GW_PORTS[0]}" "$round" >> "$results"
    for i in $(seq 1 $((${#variants[@]} - 1))); do measure "$scenario" "gw-$i" "${GW_PORTS[$i]}" "$round" >> "$results"; done
    measure "$scenario" nginx "$NGINX" "$round" >> "$results"
    measure "$scenario" haproxy "$HAPROXY" "$round" >> "$results"
    [ "$scenario" = flood ] && measure "$scenario" static "$STATIC" "$round" >> "$results"
  done
  peak_rss=$(rss_kib "$GW_PID" VmHWM)
  echo "# $scenario: gateway RSS idle ${idle_rss} KiB, peak ${peak_rss} KiB" >> "$results"
  stop_all
done

python3 - "$results" "$OUT" <<'PY'
import re, sys
path, out = sys.argv[1], sys.argv[2]
rounds = {}
for line in open(path):
    if line.startswith('#') or line.startswith('scenario'):
        continue
    s, server, _round, rps, p50, p99, bad, cpu, user = line.split()
    rounds.setdefault((s, server), []).append((float(rps), p50, p99, float(cpu), float(user), float(cpu) - float(user)))
# The median round of each server, by throughput (its own latencies come with it).
rows = {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}
def ms(v):
    return float(v[:-2]) if v.endswith('ms') else float(v[:-2]) / 1000 if v.endswith('us') else float(v[:-1]) * 1000
lines = open(path).read().rstrip('\n').split('\n')
lines.append('median rounds:')
def cpu(s, server, field=3):
    v = sorted(r[field] for r in rounds[(s, server)])
    return v[len(v) // 2]
for (s, server), (rps, p50, p99, *_) in sorted(rows.items()):
    lines.append(f'{s:<6} {server:<10} {rps:12.0f} {p50:>10} {p99:>10} {cpu(s, server):8.2f} us cpu/request, {cpu(s, server, 4):.2f} in user space (medians)')
g, n, d = rows[('allow', 'gateway')], rows[('allow', 'nginx')], rows[('allow', 'direct')]
fg, fn = rows[('flood', 'gateway')], rows[('flood', 'nginx')]
lines += [
    f"allow: gateway/nginx throughput {g[0]/n[0]:.2f} (target >= 1.0), p99 {g[2]} vs nginx {n[2]} ({'ok' if ms(g[2]) <= ms(n[2]) else 'worse'})",
    f"allow: gateway/direct throughput {g[0]/d[0]:.2f} (target >= 0.5)",
    f"flood: gateway/nginx throughput {fg[0]/fn[0]:.2f} (target >= 1.2)",
    f"allow: gateway/haproxy throughput {g[0]/rows[('allow','haproxy')][0]:.2f}; flood: {fg[0]/rows[('flood','haproxy')][0]:.2f}",
    f"cpu per request, gateway/nginx: allow {cpu('allow','gateway')/cpu('allow','nginx'):.2f}, flood {cpu('flood','gateway')/cpu('flood','nginx'):.2f} (below 1: the gateway does the job with less CPU)",
    f"kernel cpu per request (cpu less user, median of rounds), gateway/nginx: allow {cpu('allow','gateway',5)/cpu('allow','nginx',5):.2f}, flood {cpu('flood','gateway',5)/cpu('flood','nginx',5):.2f}",
]
if ('flood', 'static') in rows:
    st = rows[('flood', 'static')]
    lines.append(f"flood: ceiling (fixed 429, no checks) {st[0]:.0f}/s; nginx reaches {fn[0]/st[0]:.2f} of it, the gateway {fg[0]/st[0]:.2f}; 1.2x nginx would be {1.2*fn[0]/st[0]:.2f} of it")
text = '\n'.join(lines) + '\n'
open(f"{out}/results.txt", 'w').write(text)
print(text, end='')

# A grouped bar chart of requests/s, one group per scenario.
servers = ['direct', 'gateway', 'nginx', 'haproxy', 'static']
colors = {'direct': '#9e9e9e', 'gateway': '#1f77b4', 'nginx': '#2ca02c', 'haproxy': '#d62728', 'static': '#c7c7c7'}
top = max(v[0] for v in rows.values()) * 1.15
W, H, left, bottom = 780, 400, 70, 340
bar, gap = 60, 14
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="22" text-anchor="middle" font-size="15">Requests/s, wrk -t1 -c64, same machine and run (higher is better)</text>']
for i in range(6):
    v = top * i / 5
    y = bottom - (bottom - 40) * i / 5
    svg.append(f'<line x1="{left}" x2="{W-20}" y1="{y:.0f}" y2="{y:.0f}" stroke="#ddd"/>')
    svg.append(f'<text x="{left-6}" y="{y+4:.0f}" text-anchor="end">{v/1000:.0f}k</text>')
x = left + 20
for scenario in ['allow', 'flood']:
    start = x
    for server in servers:
        if (scenario, server) not in rows:
            continue
        rps = rows[(scenario, server)][0]
        h = (bottom - 40) * rps / top
        svg.append(f'<rect x="{x}" y="{bottom-h:.0f}" width="{bar}" height="{h:.0f}" fill="{colors[server]}"/>')
        svg.append(f'<text x="{x+bar/2}" y="{bottom-h-5:.0f}" text-anchor="middle">{rps/1000:.1f}k</text>')
        label = 'ceiling' if server == 'static' else server
        svg.append(f'<text x="{x+bar/2}" y="{bottom+16}" text-anchor="middle">{label}</text>')
        x += bar + gap
    svg.append(f'<text x="{(start+x-gap)/2}" y="{bottom+36}" text-anchor="middle" font-weight="bold">{scenario}</text>')
    x += 40
svg.append('</svg>')
open(f"{out}/chart.svg", 'w').write('\n'.join(svg) + '\n')
PY
echo "wrote $OUT/results.txt and $OUT/chart.svg"
