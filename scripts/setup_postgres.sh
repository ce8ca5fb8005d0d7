#!/usr/bin/env bash
# Set-up of `make test-e2e`: Debian's PostgreSQL server programs (initdb, pg_ctl, postgres) for the test
# of the MLflow tracking server on PostgreSQL (tests/test_mlflow_server.py), installed once with apt-get
# (needs root). The test makes its own database in a temporary folder and never starts the system's
# cluster; run as root, it runs the server as the package's `postgres` user (created here if missing).
# Nothing when everything is there.
set -euo pipefail
have_server() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; }
need_user() { [[ $(id -u) -eq 0 ]] && ! id -u postgres >/dev/null 2>&1; }
if have_server && ! need_user; then exit 0; fi
if [[ $(id -u) -ne 0 ]]; then
  echo "setup_postgres: PostgreSQL's server programs are missing and installing them needs root: apt-get install -y postgresql" >&2
  exit 1
fi
if ! have_server; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends postgresql
fi
if need_user; then
  useradd --system --user-group --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres
fi
