#!/usr/bin/env bash
# The container's entrypoint, one role per process:
#   web            gunicorn on $BIND (default 0.0.0.0:8000) with deploy/gunicorn.conf.py
#   worker         the Celery worker, queues signing and maintenance, prefork pool
#   beat           Celery beat (run exactly one)
#   migrate        database migrations
#   init-softhsm   create the SoftHSM tokens the policy names (deploy/softhsm/setup.sh)
#   init           first start, idempotent: migrate, init-softhsm, the audit checkpoint key
#   manage ARGS    python manage.py ARGS (create_user, key_ceremony, create_api_token, ...)
#   healthcheck    what the image's HEALTHCHECK runs: /healthz for web, a ping for a worker
# It is plain bash and runs on a host too (the tests run it there): every path comes from
# the environment, with the image's layout as the default.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
APP_DIR=${APP_DIR:-$(cd "$here/../.." && pwd)}
PYTHON=${PYTHON:-python3}
export VAR_DIR=${VAR_DIR:-/var/lib/modelsign}
BIND=${BIND:-0.0.0.0:8000}
# Where this container's role is noted for `healthcheck` (a separate exec in the container).
ROLE_FILE=${ROLE_FILE:-${TMPDIR:-/tmp}/modelsign-role}
cd "$APP_DIR"

manage() { "$PYTHON" manage.py "$@"; }

# A launcher that sets PROMETHEUS_MULTIPROC_DIR empties it before the processes sharing it
# start (signing_service/metrics.py): counts of a previous container's processes are stale.
fresh_metrics_dir() {
  if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -maxdepth 1 -name '*.db' -type f -delete
  fi
}

# init and migrate wait for the database (compose implementations that ignore
# `condition: service_healthy`, a Kubernetes Job started before PostgreSQL answers):
# up to DB_WAIT_SECONDS (60), then fail naming the error.
wait_for_database() {
  "$PYTHON" - <<'PY'
import os, sys, time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signing_service.settings")
import django

django.setup()
from django.db import connection

limit = float(os.environ.get("DB_WAIT_SECONDS", "60"))
deadline = time.monotonic() + limit
while True:
    try:
        connection.ensure_connection()
        break
    except Exception as exc:
        if time.monotonic() >= deadline:
            sys.exit(f"entrypoint.sh: the database did not answer within {limit:g} s: {exc}")
        time.sleep(1)
PY
}

note_role() { printf '%s\n' "$1" >"$ROLE_FILE" 2>/dev/null || true; }

init_audit_checkpoint_key() {
  if manage audit_checkpoint --public-key >/dev/null 2>&1; then
    echo "init: the audit checkpoint key is active"
  else
    manage audit_checkpoint --create-key --actor "entrypoint.sh init"
  fi
}

healthcheck() {
  local role
  role=$(cat "$ROLE_FILE" 2>/dev/null || echo unknown)
  case "$role" in
    web)
      "$PYTHON" - "http://127.0.0.1:${BIND##*:}/healthz" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as answer:
    sys.exit(0 if answer.status == 200 else 1)
PY
      ;;
    worker) "$PYTHON" -m celery -A worker.celery inspect ping -d "celery@$(hostname)" -t 5 >/dev/null ;;
    *) exit 0 ;;  # beat and one-shot roles: running is healthy
  esac
}

role=${1:-}
[ $# -gt 0 ] && shift
case "$role" in
  web)
    note_role web
    fresh_metrics_dir
    exec "$PYTHON" -m gunicorn signing_service.wsgi:application \
      -c "$APP_DIR/deploy/gunicorn.conf.py" --bind "$BIND" "$@"
    ;;
  worker)
    note_role worker
    fresh_metrics_dir
    exec "$PYTHON" -m celery -A worker.celery worker -Q signing,maintenance --pool prefork \
      --without-gossip --without-mingle -l "${CELERY_LOG_LEVEL:-info}" "$@"
    ;;
  beat)
    note_role beat
    mkdir -p "$VAR_DIR"
    exec "$PYTHON" -m celery -A worker.celery beat -l "${CELERY_LOG_LEVEL:-info}" \
      -s "$VAR_DIR/celerybeat-schedule" "$@"
    ;;
  migrate)
    wait_for_database
    exec "$PYTHON" manage.py migrate --noinput "$@"
    ;;
  init-softhsm) exec env APP_DIR="$APP_DIR" PYTHON="$PYTHON" "$APP_DIR/deploy/softhsm/setup.sh" ;;
  init)
    wait_for_database
    manage migrate --noinput
    env APP_DIR="$APP_DIR" PYTHON="$PYTHON" "$APP_DIR/deploy/softhsm/setup.sh"
    init_audit_checkpoint_key
    echo "init: done. Signing keys are made in a key ceremony by two custodians (README, Deployment)."
    ;;
  manage) exec "$PYTHON" manage.py "$@" ;;
  healthcheck) healthcheck ;;
  *)
    echo "usage: entrypoint.sh web|worker|beat|migrate|init-softhsm|init|manage ARGS|healthcheck" >&2
    echo "unknown role: ${role:-(none)}" >&2
    exit 64
    ;;
esac
