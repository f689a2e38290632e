#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, on 127.0.0.1, for trying `batchgen submit`:
# a head with the dashboard / Jobs API (and no CPUs of its own, so replicas land on workers)
# plus N worker nodes, each a separate raylet.
#
#   cluster/local-cluster.sh up      # start; prints the address to submit to
#   cluster/local-cluster.sh status  # the nodes Ray sees
#   cluster/local-cluster.sh down    # stop exactly the processes this script started
#
# Settings (environment): WORKERS=2  CPUS_PER_WORKER=1  RAY_PORT=6390  DASHBOARD_PORT=8265
#   STATE_DIR=.cluster (where the script remembers its cluster; one cluster per STATE_DIR)
#   RAY=ray  PYTHON=python3 (the programs to use)
# Token authentication is on (RAY_AUTH_MODE=token): the token is RAY_AUTH_TOKEN if set, else
# ~/.ray/auth_token, which `ray start` creates if missing. The script never prints it.
#
# Everything Ray writes goes to a private RAY_TMPDIR, and `down` kills only the processes that
# carry it: never `ray stop`, which stops every Ray on the host.
set -euo pipefail

WORKERS=${WORKERS:-2}
CPUS_PER_WORKER=${CPUS_PER_WORKER:-1}
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
STATE_DIR=${STATE_DIR:-.cluster}
RAY=${RAY:-ray}
PYTHON=${PYTHON:-python3}

export RAY_AUTH_MODE=token
# Every node is pinned to loopback with --node-ip-address: Ray otherwise swaps 127.0.0.1 for the
# host's detected address.
export RAY_USAGE_STATS_ENABLED=0

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Every process of this cluster: those whose command line names its temp dir or that carry it
# as RAY_TMPDIR, and all their descendants (Ray's agents rename themselves, ray::DashboardAgent,
# and may clobber their environment). Never this script or its callers.
cluster_pids() {
  "$PYTHON" - "$1" "$$" <<'PY'
import os, sys
tmp, me = sys.argv[1], int(sys.argv[2])
parent, found = {}, set()
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    try:
        with open(f"/proc/{name}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        if state == "Z":  # exited, waiting to be reaped: nothing to stop
            continue
        parent[int(name)] = int(ppid)
        with open(f"/proc/{name}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{name}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except (OSError, ValueError, IndexError):
        continue
    if tmp.encode() in cmdline or f"RAY_TMPDIR={tmp}".encode() in environ:
        found.add(int(name))
keep, q = set(), me
while q > 1 and q not in keep:  # this script and its callers
    keep.add(q)
    q = parent.get(q, 1)
changed = True
while changed:  # and every descendant of what matched
    changed = False
    for pid, ppid in parent.items():
        if ppid in found and pid not in found:
            found.add(pid)
            changed = True
print(" ".join(str(p) for p in sorted(found - keep)))
PY
}

up() {
  if [[ -f $STATE_DIR/tmpdir && -n $(cluster_pids "$(cat "$STATE_DIR/tmpdir")") ]]; then
    echo "a cluster from $STATE_DIR is already running (cluster/local-cluster.sh down first)" >&2
    exit 1
  fi
  mkdir -p "$STATE_DIR"
  # Unix socket paths must stay short, so the temp dir lives directly under /tmp.
  RAY_TMPDIR=$(mktemp -d /tmp/bgray-XXXXXX)
  export RAY_TMPDIR
  echo "$RAY_TMPDIR" >"$STATE_DIR/tmpdir"
  echo "http://127.0.0.1:$DASHBOARD_PORT" >"$STATE_DIR/address"
  # Each node's dashboard agent gets its own port (all default to 52365, which collides when
  # several nodes share a host), and so does the head's Ray client server (default 10001).
  "$RAY" start --head --port "$RAY_PORT" --node-ip-address 127.0.0.1 --num-cpus 0 \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$(free_port)" --ray-client-server-port "$(free_port)" \
    --temp-dir "$RAY_TMPDIR" --disable-usage-stats >"$STATE_DIR/head.log" 2>&1 \
    || { cat "$STATE_DIR/head.log" >&2; down; exit 1; }
  for i in $(seq 1 "$WORKERS"); do
    "$RAY" start --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 \
      --dashboard-agent-listen-port "$(free_port)" \
      --num-cpus "$CPUS_PER_WORKER" \
      --disable-usage-stats >"$STATE_DIR/worker-$i.log" 2>&1 \
      || { cat "$STATE_DIR/worker-$i.log" >&2; down; exit 1; }
  done
  echo "local Ray cluster up: head + $WORKERS worker node(s) on 127.0.0.1"
  echo "  Jobs API / dashboard: http://127.0.0.1:$DASHBOARD_PORT"
  echo "  GCS (batchgen run --address): 127.0.0.1:$RAY_PORT"
  echo "  token: RAY_AUTH_TOKEN if set, else ~/.ray/auth_token"
  echo "  try: batchgen submit jobs/demo.yaml --address http://127.0.0.1:$DASHBOARD_PORT --wait"
}

status() {
  [[ -f $STATE_DIR/tmpdir ]] || { echo "no cluster from $STATE_DIR" >&2; exit 1; }
  RAY_TMPDIR=$(cat "$STATE_DIR/tmpdir") "$RAY" status --address "127.0.0.1:$RAY_PORT"
}

down() {
  [[ -f $STATE_DIR/tmpdir ]] || { echo "no cluster from $STATE_DIR" >&2; return 0; }
  local tmp
  tmp=$(cat "$STATE_DIR/tmpdir")
  [[ $tmp == /tmp/bgray-* ]] || { echo "refusing to clean $tmp" >&2; exit 1; }
  local pids
  pids=$(cluster_pids "$tmp")
  [[ -z $pids ]] || kill -TERM $pids 2>/dev/null || true
  # Raylets and the GCS ignore SIGTERM while they have work; nothing here needs a clean exit.
  for _ in $(seq 1 6); do [[ -n $(cluster_pids "$tmp") ]] || break; sleep 0.5; done
  pids=$(cluster_pids "$tmp")
  [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
  rm -rf "$tmp" "$STATE_DIR/tmpdir"
  echo "local Ray cluster stopped"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
