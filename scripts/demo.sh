#!/usr/bin/env bash
# `make demo`: the scaling study (smoke preset, bundled digits) submitted as a Ray job, as on a cluster.
#
#   1. a Ray head: $RAY_ADDRESS if set, else one answering jobs at http://127.0.0.1:8265, else a local head
#      started here (RAY_AUTH_MODE=disabled, free ports, --num-cpus 2);
#   2. ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python studies/scaling_imagenet512.py
#   3. the head started here, and only it, is stopped (by the ids of its processes; never `ray stop`);
#   4. where the dashboard is and how to open the MLflow UI on the runs.
#
# Results go where cluster/runtime_env.yaml puts them: MLflow at sqlite:///$HOME/lossfloor/mlflow.db and
# outputs under $HOME/lossfloor/runs/scaling_imagenet512/ (a rerun reuses finished stages and continues the
# same MLflow parent run and children instead of logging new ones: lossfloor.jobs.study.open_study).
# Extra arguments go to the study, e.g. `scripts/demo.sh --smoke-budget tiny`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
RAY=$VENV/bin/ray
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export PATH="$PWD/$VENV/bin:$PATH"  # the job's `python` (on a head started here) is the environment's
RESULTS=$HOME/lossfloor  # ${HOME}/lossfloor of cluster/runtime_env.yaml (the head runs here)
OUT=$RESULTS/runs/scaling_imagenet512
t0=$(date +%s)

head_sid="" temp_dir=""
stop_head() {  # the processes of the head's session (`ray start` ran in a new session made here)
  [[ -n $head_sid ]] || return 0
  local sig pids
  for sig in TERM KILL; do
    pids=$(ps -o pid= -s "$head_sid" 2>/dev/null | tr -d ' ' | grep -vx "$$" || true)
    [[ -n $pids ]] || break
    kill -s "$sig" $pids 2>/dev/null || true
    for _ in $(seq 40); do
      ps -o pid= -s "$head_sid" >/dev/null 2>&1 || break
      sleep 0.25
    done
  done
  [[ -n $temp_dir ]] && rm -rf "$temp_dir"
  echo "demo: stopped the Ray head started here (session $head_sid)"
  head_sid=""
}
trap stop_head EXIT INT TERM

answers_jobs() { "$RAY" job list --address "$1" >/dev/null 2>&1; }

if [[ -n ${RAY_ADDRESS:-} ]]; then
  address=$RAY_ADDRESS
  echo "demo: using the Ray cluster at \$RAY_ADDRESS=$address"
elif answers_jobs http://127.0.0.1:8265; then
  address=http://127.0.0.1:8265
  echo "demo: using the Ray head already running at $address"
else
  read -r gcs dash client agent < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
  temp_dir=$(mktemp -d /tmp/lfdemo-XXXXXX)  # short: Ray socket paths must stay under 108 characters
  address=http://127.0.0.1:$dash
  echo "demo: starting a local Ray head (2 CPUs, dashboard $address, logs $temp_dir/head.log)"
  # RAY_worker_niceness=0: run the study's workers at normal priority (Ray's default, 15, starves them
  # on a busy machine)
  RAY_worker_niceness=0 setsid "$RAY" start --head --block --port "$gcs" --dashboard-port "$dash" \
    --include-dashboard=true --dashboard-host 127.0.0.1 --num-cpus 2 --num-gpus 0 \
    --ray-client-server-port "$client" --dashboard-agent-listen-port "$agent" --temp-dir "$temp_dir" \
    --disable-usage-stats >"$temp_dir/head.log" 2>&1 &
  head_sid=$!  # setsid without fork: the pid is the new session's id
  disown "$head_sid"  # stopped by stop_head, not reported by this shell
  for _ in $(seq 120); do
    answers_jobs "$address" && break
    kill -0 "$head_sid" 2>/dev/null || { echo "demo: ray start failed:"; tail -20 "$temp_dir/head.log"; exit 1; }
    sleep 1
  done
  answers_jobs "$address" || { echo "demo: the Ray head did not answer at $address"; tail -20 "$temp_dir/head.log"; exit 1; }
fi

echo "demo: ray job submit -- python studies/scaling_imagenet512.py $*"
"$RAY" job submit --address "$address" --working-dir . --runtime-env cluster/runtime_env.yaml \
  -- python studies/scaling_imagenet512.py "$@"
stop_head

echo
echo "demo: finished in $(( $(date +%s) - t0 )) s"
if [[ -f $OUT/summary.json ]]; then
  "$PY" - "$OUT/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"dashboard (opens offline): {s['dashboard']}")
print(f"MLflow runs: {s['tracking_uri']}, experiment {s['experiment']!r}, parent run {s['parent_run_id']}")
print(f"open the MLflow UI:  {sys.executable.rsplit('/', 1)[0]}/{s['mlflow_ui']}")
EOF
else
  echo "demo: results are on the cluster's head node under ~/lossfloor (runs/scaling_imagenet512, mlflow.db)"
fi
