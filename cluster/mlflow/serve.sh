#!/usr/bin/env bash
# The cluster's MLflow tracking server: runs (params, metrics, tags, dataset inputs) in PostgreSQL, artifacts
# in one shared root served through the server (clients need no bucket credentials). See README.md here.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@DBHOST:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/mlflow  bash cluster/mlflow/serve.sh
#
# Settings (environment; the systemd unit and the Kubernetes Deployment here set them):
#   MLFLOW_BACKEND_STORE_URI      required: postgresql://USER:PASSWORD@HOST:PORT/DB (driver: psycopg, SQLAlchemy's default)
#   MLFLOW_ARTIFACTS_DESTINATION  the shared artifact root: s3://..., gs://..., or a folder every reader
#                                 of the server sees (default: ~/lossfloor/mlartifacts on this machine)
#   MLFLOW_HOST (0.0.0.0)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (4)
#   MLFLOW_ALLOWED_HOSTS   the Host headers clients use, e.g. "mlflow.internal:5000,mlflow.internal"
#                          (default: MLflow's, localhost and private addresses)
#   MLFLOW                 the mlflow command (default: mlflow on PATH)
# The tables are created (or migrated) on first start; the server then answers GET /health.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:PORT/DB}"
dest="${MLFLOW_ARTIFACTS_DESTINATION:-$HOME/lossfloor/mlartifacts}"
case "$dest" in
  *://*) ;;
  *) mkdir -p "$dest"; dest="$(cd "$dest" && pwd)" ;;  # a local folder: absolute
esac
mlflow_cmd="${MLFLOW:-mlflow}"
if ! command -v "$mlflow_cmd" >/dev/null 2>&1; then
  echo "serve.sh: no $mlflow_cmd command (pip install -e . from a lossfloor checkout, or set MLFLOW=PATH/mlflow)" >&2
  exit 2
fi
if [[ "$MLFLOW_BACKEND_STORE_URI" == postgresql* ]]; then
  py="$(dirname "$(command -v "$mlflow_cmd")")/python"
  [[ -x "$py" ]] || py=python3
  if ! "$py" -c 'import psycopg' 2>/dev/null; then
    echo "serve.sh: the PostgreSQL driver is missing for $mlflow_cmd: pip install 'psycopg[binary]'" >&2
    exit 2
  fi
fi
args=(server
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$dest"
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
# the log line names the database without its password
echo "serve.sh: mlflow server on ${MLFLOW_HOST:-0.0.0.0}:${MLFLOW_PORT:-5000}," \
  "runs in $(sed -E 's#://([^:@/]*):[^@]*@#://\1:***@#' <<<"$MLFLOW_BACKEND_STORE_URI"), artifacts in $dest" >&2
exec "$mlflow_cmd" "${args[@]}"
