#!/usr/bin/env bash
# A Ray head on this machine for dbgen jobs: dashboard + job server and metrics on 127.0.0.1, every port explicit.
#
#   bash cluster/local_head.sh                    # runs in the foreground (ray start --block)
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
#       -- python -m dbgen.train --config configs/rvae_binary_tiny.yaml
#   kill <PID of this script>                     # SIGTERM stops the head and everything it started
#                                                 # (in ~5 s; up to ~30 s after a Ray Train job)
#
# Why every port is explicit: with Ray's defaults a leftover dashboard agent from an earlier cluster on the host
# (port 52365) makes every later `ray job submit` fail with "No available agent to submit job". Each port can be
# overridden by the environment variable named below. Do not use `ray stop` to stop it: that stops every Ray
# process on the host.
#
# Auth: Ray 2.6x heads use token auth by default and write the token to ~/.ray/auth_token on first start; the
# `ray job submit` CLI then needs RAY_AUTH_MODE=token (it reads the same file). To run without auth on a
# single-user machine, start this script with RAY_AUTH_MODE=disabled and submit without it.
#
# Node IP: Ray rewrites --node-ip-address=127.0.0.1 to the host's address for its internal node id; the dashboard,
# job server and metrics endpoint stay bound as given here.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${RAY_PORT:=6380}"                    # GCS (ray.init / ray start --address=127.0.0.1:$RAY_PORT)
: "${DASHBOARD_PORT:=8265}"              # dashboard and job server (ray job submit --address)
: "${METRICS_PORT:=8080}"                # Prometheus metrics of this node (cluster/prometheus.yml)
: "${DASHBOARD_AGENT_LISTEN_PORT:=52366}"
: "${DASHBOARD_AGENT_GRPC_PORT:=52367}"
: "${RUNTIME_ENV_AGENT_PORT:=52368}"
: "${RAY_CLIENT_SERVER_PORT:=10002}"
: "${NODE_MANAGER_PORT:=52370}"
: "${OBJECT_MANAGER_PORT:=52371}"
: "${MIN_WORKER_PORT:=52400}"
: "${MAX_WORKER_PORT:=52599}"
: "${RAY_TEMP_DIR:=/tmp/ray}"            # sessions, logs, Prometheus service discovery (cluster/prometheus.yml)
: "${NUM_CPUS:=$(nproc)}"

RAY=ray
[ -x .venv/bin/ray ] && RAY=.venv/bin/ray
# Job entrypoints run `python` from this process's PATH: use the project's environment.
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"

echo "Ray head: dashboard/jobs http://127.0.0.1:${DASHBOARD_PORT}  metrics http://127.0.0.1:${METRICS_PORT}" \
     "  GCS 127.0.0.1:${RAY_PORT}  temp ${RAY_TEMP_DIR}  (PID $$; stop with: kill $$)" >&2
exec "$RAY" start --head --block \
  --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --include-dashboard=true \
  --port="$RAY_PORT" \
  --dashboard-port="$DASHBOARD_PORT" \
  --metrics-export-port="$METRICS_PORT" \
  --dashboard-agent-listen-port="$DASHBOARD_AGENT_LISTEN_PORT" \
  --dashboard-agent-grpc-port="$DASHBOARD_AGENT_GRPC_PORT" \
  --runtime-env-agent-port="$RUNTIME_ENV_AGENT_PORT" \
  --ray-client-server-port="$RAY_CLIENT_SERVER_PORT" \
  --node-manager-port="$NODE_MANAGER_PORT" \
  --object-manager-port="$OBJECT_MANAGER_PORT" \
  --min-worker-port="$MIN_WORKER_PORT" --max-worker-port="$MAX_WORKER_PORT" \
  --temp-dir="$RAY_TEMP_DIR" \
  --num-cpus="$NUM_CPUS" \
  --disable-usage-stats
