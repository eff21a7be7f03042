#!/usr/bin/env bash
# A two-node Ray cluster on this machine whose nodes talk over a rate-limited, delayed link (root only).
#
#   DIR=$(bash benchmarks/netns_cluster.sh up 1gbit 0.1ms)   # prints the cluster's state folder
#   bash benchmarks/netns_cluster.sh exec "$DIR" python -m dbgen.bench comm ...   # a driver on the head's side
#   bash benchmarks/netns_cluster.sh set "$DIR" 100mbit 1ms  # change the link while the cluster runs
#   bash benchmarks/netns_cluster.sh down "$DIR"             # stop and remove everything
#
# Layout: two network namespaces, <id>a and <id>b (id: "dbnc" + 6 random hex digits, so concurrent runs never
# collide), joined by a veth pair created directly inside them (the host's own interfaces and namespace are never
# touched; the pair is named veth0 on both sides). Addresses 10.77.0.1/24 (a) and 10.77.0.2/24 (b) exist only
# inside these namespaces. Each veth0 sends through tbf (RATE), under netem (one-way delay LATENCY) when LATENCY
# is not 0, so the round trip is 2 x LATENCY. A Ray head runs in a, a Ray worker node in b, 1 CPU each, every port explicit
# (each namespace has its own port space, so fixed port numbers cannot clash with the host or another run; all
# of Ray's ports are below the kernel's ephemeral range, where gloo's connections live). Both nodes and every
# driver started by `exec` see RAY_AUTH_MODE=disabled (the nodes are reachable only from these namespaces),
# GLOO_SOCKET_IFNAME=veth0 (torch.distributed's gloo would otherwise pick an address by host name) and Ray's
# multi-node mode on.
#
# RATE: <integer>{kbit,mbit,gbit} (tc units, bits per second). LATENCY: a tc time, e.g. 0.1ms, 1ms, or 0 for
# none: a delay needs the kernel's netem qdisc (CONFIG_NET_SCH_NETEM), which some kernels lack (then only 0 works
# and the link's own round trip, tens of microseconds, is the latency).
# State folder (short, under /tmp: Ray's unix socket paths must stay under 108 bytes): env (RAY_ADDRESS and the
# settings above, for drivers), pids (the two `ray start --block` processes), logs, Ray's temp dir.
#
# `down` stops each `ray start --block` by its PID (SIGTERM: it stops what it started), then SIGKILLs whatever
# still runs inside the two namespaces (`ip netns pids`: only processes in them), deletes the namespaces (which
# deletes the veth pair) and the folder; bounded in time (about 40 s at most). `up` first removes the leftovers
# of earlier runs of this script whose Ray processes are gone (a crashed run), and removes its own half-built
# cluster if it fails.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # ip and tc, also for callers whose PATH lacks them (Ray workers)

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
RAY="${RAY_BIN:-$ROOT/.venv/bin/ray}"
PYTHON="$(dirname "$RAY")/python"
IP_A=10.77.0.1
IP_B=10.77.0.2
GCS_PORT=6379
UP_TIMEOUT_S="${NETNS_CLUSTER_UP_TIMEOUT_S:-120}"

die() { echo "netns_cluster.sh: $*" >&2; exit 1; }

usage() {
  sed -n '2,7p' "$0" >&2
  exit 2
}

check_host() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, tc)"
  command -v ip >/dev/null || die "needs iproute2's ip"
  command -v tc >/dev/null || die "needs iproute2's tc"
  [ -x "$RAY" ] || die "no Ray CLI at $RAY (set RAY_BIN)"
}

check_dir() {  # a state folder made by `up`
  [ -n "${1:-}" ] && [ -f "$1/id" ] || die "${1:-<missing>}: not a cluster folder made by '$0 up' (no id file)"
}

rate_bits() {  # tc rate -> bits per second
  [[ "$1" =~ ^([0-9]+)(kbit|mbit|gbit)$ ]] || die "rate '$1': expected <integer>kbit|mbit|gbit, e.g. 1gbit"
  local n="${BASH_REMATCH[1]}" unit="${BASH_REMATCH[2]}"
  case "$unit" in kbit) echo $((n * 1000)) ;; mbit) echo $((n * 1000000)) ;; gbit) echo $((n * 1000000000)) ;; esac
}

check_latency() {
  [[ "$1" =~ ^(0|[0-9]+(\.[0-9]+)?(us|ms))$ ]] || die "latency '$1': expected 0 or a tc time such as 0.1ms, 100us"
}

shape() {  # shape NS RATE LATENCY: tbf at RATE on NS's veth0, under a netem delay of LATENCY unless it is 0
  local ns="$1" rate="$2" latency="$3" bits burst
  bits="$(rate_bits "$rate")"
  # tbf's bucket: 1 ms at the rate, at least 70 kB (a 64 KiB GSO segment plus headers), so it never caps a rate
  burst=$((bits / 8 / 1000))
  [ "$burst" -ge 70000 ] || burst=70000
  ip netns exec "$ns" tc qdisc del dev veth0 root 2>/dev/null || true
  if [ "$latency" = 0 ]; then
    ip netns exec "$ns" tc qdisc add dev veth0 root handle 10: tbf rate "$rate" burst "$burst" latency 100ms
  else
    ip netns exec "$ns" tc qdisc add dev veth0 root handle 1: netem delay "$latency" limit 1000000 ||
      die "cannot add a netem delay on this kernel (CONFIG_NET_SCH_NETEM off?); pass LATENCY 0 for no added delay"
    ip netns exec "$ns" tc qdisc add dev veth0 parent 1:1 handle 10: tbf rate "$rate" burst "$burst" latency 100ms
  fi
}

node_ports() {  # the same fixed ports on both nodes (each namespace has its own port space)
  echo --node-manager-port=6380 --object-manager-port=6381 --dashboard-agent-listen-port=6382 \
    --dashboard-agent-grpc-port=6383 --runtime-env-agent-port=6384 --metrics-export-port=6385 \
    --min-worker-port=11000 --max-worker-port=11999
}

start_node() {  # start_node DIR NS LOGNAME ARGS...: setsid'd `ray start --block` in NS; appends its PID to DIR/pids
  local dir="$1" ns="$2" log="$3"
  shift 3
  # setsid: its own session and process group (its PID), so `down` can signal exactly what it started.
  # shellcheck disable=SC1091
  (set -a && . "$dir/env" && exec setsid ip netns exec "$ns" "$RAY" start --block "$@" >"$dir/$log.log" 2>&1) &
  echo $! >>"$dir/pids"
}

wait_nodes() {  # wait_nodes DIR N: until N nodes are alive (driver-side check from namespace a); 1 if a node exits
  local dir="$1" n="$2" deadline=$((SECONDS + UP_TIMEOUT_S))
  while [ $SECONDS -lt $deadline ]; do
    while read -r pid; do
      kill -0 "$pid" 2>/dev/null || return 1
    done <"$dir/pids"
    if (set -a && . "$dir/env" && ip netns exec "$(cat "$dir/id")a" timeout 60 "$PYTHON" -c "
import ray, sys
ray.init(logging_level='ERROR', log_to_driver=False)
sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= $n else 1)" >/dev/null 2>&1); then
      return 0
    fi
    sleep 1
  done
  tail -n 40 "$dir"/*.log >&2
  die "$n Ray nodes not alive after ${UP_TIMEOUT_S}s"
}

start_and_wait() {  # start_and_wait DIR NS NAME N ARGS...: start_node, then wait_nodes DIR N; 3 tries
  # Ray gives a starting node 30 s (hard-coded) to register with the GCS; on a heavily loaded machine that can
  # pass, and the node exits: start it again.
  local dir="$1" ns="$2" name="$3" n="$4" attempt
  shift 4
  for attempt in 1 2 3; do
    start_node "$dir" "$ns" "$name" "$@"
    wait_nodes "$dir" "$n" && return 0
    grep -v "^$(tail -n1 "$dir/pids")\$" "$dir/pids" >"$dir/pids.new" || true  # forget the exited node
    mv "$dir/pids.new" "$dir/pids"
    echo "netns_cluster.sh: ray $name node exited (try $attempt of 3):" >&2
    tail -n 5 "$dir/$name.log" >&2
  done
  die "ray $name node did not start"
}

down() {
  local dir="$1" id pid deadline
  check_dir "$dir"
  id="$(cat "$dir/id")"
  if [ -f "$dir/pids" ]; then
    while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done < <(tac "$dir/pids")  # worker node first
    deadline=$((SECONDS + 15))
    while [ $SECONDS -lt $deadline ]; do
      alive=0
      while read -r pid; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done <"$dir/pids"
      [ $alive = 0 ] && break
      sleep 0.5
    done
    while read -r pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done <"$dir/pids"
  fi
  for ns in "${id}a" "${id}b"; do
    if ip netns list | grep -qw "$ns"; then
      # anything else still inside (a driver, a Ray worker that left its process group): only these namespaces
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [ -z "$pids" ] && break
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.5
      done
      ip netns del "$ns" 2>/dev/null || true  # removes its end of the veth pair, and so the pair
    fi
  done
  rm -rf "$dir"
}

clean_stale() {  # folders of earlier runs whose Ray processes are all gone (crashed before `down`)
  local dir pid alive
  for dir in /tmp/dbnc??????; do
    [ -f "$dir/id" ] || continue
    alive=0
    if [ -f "$dir/pids" ]; then
      while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$dir/pids"
    else
      # being built right now by another `up` (it writes pids within a second), or crashed before that
      [ -n "$(find "$dir/id" -mmin -5)" ] && alive=1
    fi
    [ $alive = 0 ] && { echo "netns_cluster.sh: removing leftover $dir" >&2; down "$dir"; }
  done
  return 0
}

up() {
  local rate="$1" latency="$2" id dir
  rate_bits "$rate" >/dev/null
  check_latency "$latency"
  clean_stale
  id="dbnc$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
  dir="/tmp/$id"
  mkdir "$dir"
  echo "$id" >"$dir/id"
  # shellcheck disable=SC2064
  trap "echo 'netns_cluster.sh: up failed; removing $dir' >&2; down '$dir'" EXIT
  mkdir "$dir/ray"
  cat >"$dir/env" <<EOF
RAY_ADDRESS=$IP_A:$GCS_PORT
RAY_AUTH_MODE=disabled
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
GLOO_SOCKET_IFNAME=veth0
RAY_TMPDIR=$dir/ray
NETNS_CLUSTER_DIR=$dir
EOF
  ip netns add "${id}a"
  ip netns add "${id}b"
  ip link add veth0 netns "${id}a" type veth peer name veth0 netns "${id}b"
  ip netns exec "${id}a" ip addr add "$IP_A/24" dev veth0
  ip netns exec "${id}b" ip addr add "$IP_B/24" dev veth0
  for ns in "${id}a" "${id}b"; do
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set veth0 up
    shape "$ns" "$rate" "$latency"
  done
  # shellcheck disable=SC2046
  start_and_wait "$dir" "${id}a" head 1 --head --node-ip-address="$IP_A" --port="$GCS_PORT" --include-dashboard=false \
    --dashboard-port=6386 --ray-client-server-port=6387 --num-cpus=1 --temp-dir="$dir/ray" \
    --object-store-memory=300000000 --disable-usage-stats $(node_ports)
  # shellcheck disable=SC2046
  start_and_wait "$dir" "${id}b" worker 2 --address="$IP_A:$GCS_PORT" --node-ip-address="$IP_B" --num-cpus=1 \
    --object-store-memory=300000000 --disable-usage-stats $(node_ports)
  trap - EXIT
  echo "$dir"
}

case "${1:-}" in
  up)
    [ $# = 3 ] || usage
    check_host
    up "$2" "$3"
    ;;
  set)
    [ $# = 4 ] || usage
    check_host
    check_dir "$2"
    rate_bits "$3" >/dev/null
    check_latency "$4"
    for side in a b; do shape "$(cat "$2/id")$side" "$3" "$4"; done
    ;;
  exec)
    [ $# -ge 3 ] || usage
    check_dir "$2"
    dir="$2"
    shift 2
    # shellcheck disable=SC1091
    set -a && . "$dir/env" && set +a
    exec ip netns exec "$(cat "$dir/id")a" "$@"
    ;;
  down)
    [ $# = 2 ] || usage
    check_host
    down "$2"
    ;;
  *) usage ;;
esac
