#!/usr/bin/env bash
# What the rate-limit script costs Redis, in instructions per request decided: redis-server
# runs under valgrind's callgrind while a small client sends the same kind of script call
# the gateway makes under store-modes.sh's load (BATCH requests per call, each charging
# four groups and five quotas and denied by none: one client and one IP, whose keys every
# request shares with the global key, and a new address each time, whose per-email key
# (holding both its quotas) is new; NEW_IPS=1 gives each request a new per-IP key as well). Unlike CPU time on a shared machine, the count moves by about 1-2% between runs
# (the keys are random), so it is the figure to compare two versions of the script by.
#
#   benches/load/redis-script.sh                          # this tree's script
#   LAYOUT=packed SCRIPT=/path/to/older/redis.lua ...     # a script from before one key
#                                                         # per group (a key per quota)
#   LAYOUT=args SCRIPT=/path/to/older/redis.lua ...       # a script from before the numbers
#                                                         # were packed into one argument
#   LAYOUT=packed1 SCRIPT=...                             # packed numbers, every key of
#                                                         # every request (commit 65cafe3)
#   BATCH=64 CALLS=100 benches/load/redis-script.sh
#
# A call's fixed cost is large beside a request's (BATCH=1 against BATCH=16 shows it), so
# compare at the batch sizes the gateway makes: the requests/script call of store-modes.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCRIPT=${SCRIPT:-crates/reset-guard/src/limit/redis.lua}
BATCH=${BATCH:-16}
CALLS=${CALLS:-300}
LAYOUT=${LAYOUT:-slots}
NEW_IPS=${NEW_IPS:-0}

# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
install_missing valgrind redis-server
command -v redis-cli >/dev/null || install_missing redis-tools

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

# One call to warm the script cache, then count only the measured calls.
calls() { python3 - "$port" "$sha" "$BATCH" "$1" "$LAYOUT" "$NEW_IPS" <<'PY'
import random, socket, struct, sys
port, sha, batch, calls, layout = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
new_ips = sys.argv[6] == '1'
# The limits of store-modes.sh as the gateway passes them (per group its quota count, then
# interval_us, capacity_us and shadow per quota): per-IP, per-client and global too high to
# deny, per-email 3/1h and 10/24h.
sets = [1, 1, 100000000, 0, 1, 1, 100000000, 0,
        2, 1200000000, 3600000000, 0, 8640000000, 86400000000, 0, 1, 1, 100000000, 0]
starts = [4, 8, 12, 19]  # where each set's count sits in the numbers (Lua counts from 1)
def ip_key(ip): return 'rg:per_ip:1.100000000:%016x' % ip
CLIENT, GLOBAL = 'rg:per_client:1.100000000:0000000000000001', 'rg:global:1.100000000:0000000000000000'
def email_keys(email):
    return ['rg:per_email:1200000000.3600000000:%016x' % email, 'rg:per_email:8640000000.86400000000:%016x' % email]
def command(args):
    out = [b'*%d\r\n' % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b'$%d\r\n%s\r\n' % (len(a), a))
    return b''.join(out)
def packed(numbers):
    return struct.pack('<%dd' % len(numbers), *numbers)
s = socket.create_connection(('127.0.0.1', port))
f = s.makefile('rb')
def reply():
    line = f.readline()
    if line[:1] == b'*':
        for _ in range(int(line[1:])):
            reply()
    elif line[:1] == b'$' and int(line[1:]) >= 0:
        f.read(int(line[1:]) + 2)
    elif line[:1] == b'-':
        sys.exit('redis: ' + line.decode().strip())
for _ in range(calls):
    # As wrk drives the gateway: one client, a new address each request, one IP (or a new one).
    hashes = [(random.getrandbits(64) if new_ips else 1, random.getrandbits(64)) for _ in range(batch)]
    if layout == 'slots':
        # One key per group and hash, holding each of its quotas (a slot); per request and
        # group, where its quota set starts and the number of each quota's slot; then the
        # slot table: per key its slot count and, per slot, where a set holds its numbers.
        sets_of = {5: [6], 9: [10], 13: [14, 17], 20: [21]}
        key_slots, order, wanted = {}, [], []
        for ip, email in hashes:
            groups = [(5, 'rg:per_ip:%016x' % ip), (9, 'rg:per_client:0000000000000001'),
                      (13, 'rg:per_email:%016x' % email), (20, 'rg:global:0000000000000000')]
            for start, key in groups:
                if key not in key_slots:
                    key_slots[key] = sets_of[start]
                    order.append(key)
            wanted.append(groups)
        number, table = {}, []
        for key in order:
            table.append(len(key_slots[key]))
            for at in key_slots[key]:
                number[(key, at)] = len(number) + 1
                table.append(at)
        numbers = []
        for groups in wanted:
            numbers.append(4)
            for start, key in groups:
                numbers += [start] + [number[(key, at)] for at in sets_of[start]]
        header = [batch, 0, 5 + len(sets), 5 + len(sets) + len(numbers)]
        args = [b'EVALSHA', sha, len(order)] + order + [packed(header + sets + numbers + table)]
    elif layout == 'packed':
        # Each distinct key once; per request and group, where its quota set starts and the
        # index of each quota's key.
        keys, index, numbers = [], {}, []
        def at(key):
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            return index[key]
        for ip, email in hashes:
            e1, e2 = email_keys(email)
            numbers += [4, starts[0], at(ip_key(ip)), starts[1], at(CLIENT),
                        starts[2], at(e1), at(e2), starts[3], at(GLOBAL)]
        args = [b'EVALSHA', sha, len(keys)] + keys + [packed([batch, 0, 4 + len(sets)] + sets + numbers)]
    else:
        keys, requests = [], []
        for ip, email in hashes:
            keys += [ip_key(ip), CLIENT] + email_keys(email) + [GLOBAL]
            requests += [4, 1, 2, 3, 4]
        if layout == 'packed1':
            args = [b'EVALSHA', sha, len(keys)] + keys + [packed([batch, 4, 0] + sets + requests)]
        else:
            args = [b'EVALSHA', sha, len(keys)] + keys + [batch, 4, 0] + sets + requests
    s.sendall(command(args))
    reply()
PY
}
calls 1
callgrind_control -z "$vg" >/dev/null 2>&1
calls "$CALLS"
callgrind_control -d "$vg" >/dev/null 2>&1
redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
wait "$vg" 2>/dev/null || true
vg=
total=$(awk '/^totals:/ {print $2}' "$work"/callgrind.out* | sort -n | tail -1)
printf '%s: %d calls of %d requests, %d instructions per request in redis-server\n' \
  "$SCRIPT" "$CALLS" "$BATCH" $((total / (CALLS * BATCH)))
