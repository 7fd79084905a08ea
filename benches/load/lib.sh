# Helpers shared by the load scripts; sourced, not run.

# Installs, from Debian, each of the given commands that is missing (each is its package).
install_missing() {
  local need=() tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || need+=("$tool")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# A loopback port nothing listens on right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 30 s for something to listen on a loopback port.
wait_port() {
  for _ in $(seq 600); do
    (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 never opened" >&2
  exit 1
}
