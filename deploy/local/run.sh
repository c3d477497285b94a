#!/usr/bin/env bash
# The local stack for `make run`: Redis (unless one already answers on REDIS_PORT), the Celery
# worker and beat in the background, gunicorn in the foreground. Stopping gunicorn (Ctrl-C,
# SIGTERM, or a crash) stops everything this script started, and nothing else.
set -euo pipefail

VENV=${VENV:-.venv}
VAR_DIR=${VAR_DIR:?VAR_DIR must be set}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
REDIS_PORT=${REDIS_PORT:-6390}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:${REDIS_PORT}/0}
# Approved requests are signed by the worker: waits (no active key, HSM down) are retried.
export SIGNING_MODE=${SIGNING_MODE:-worker}
LOG_DIR="$VAR_DIR/log"
mkdir -p "$LOG_DIR" "$VAR_DIR/redis"
# Metrics: gunicorn's workers and the Celery worker's pool write their counters here and
# /metrics sums them (signing_service/metrics.py). Emptied once, before any of them starts.
export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-$VAR_DIR/prometheus}
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
find "$PROMETHEUS_MULTIPROC_DIR" -maxdepth 1 -name '*.db' -type f -delete

pids=()
stop_all() {
  trap - EXIT INT TERM
  # Reverse start order: gunicorn and beat stop sending before the worker and broker go.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

alive() { sleep 2; kill -0 "$1" 2>/dev/null && echo running || echo "FAILED (see $2)"; }

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  redis_status="already running on port $REDIS_PORT (not managed here)"
else
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$VAR_DIR/redis" \
    --save "" --appendonly yes >"$LOG_DIR/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis_status="started on port $REDIS_PORT (log: $LOG_DIR/redis.log)"
fi

"$VENV/bin/celery" -A worker.celery worker -Q signing,maintenance --pool prefork \
  --without-gossip --without-mingle -l info >"$LOG_DIR/worker.log" 2>&1 &
pids+=($!)
worker_pid=$!
"$VENV/bin/celery" -A worker.celery beat -l info \
  -s "$VAR_DIR/celerybeat-schedule" >"$LOG_DIR/beat.log" 2>&1 &
pids+=($!)
beat_pid=$!

echo "  Redis:                 $redis_status"
echo "  Celery worker:         $(alive "$worker_pid" "$LOG_DIR/worker.log") (log: $LOG_DIR/worker.log)"
echo "  Celery beat:           $(alive "$beat_pid" "$LOG_DIR/beat.log") (log: $LOG_DIR/beat.log)"
echo

"$VENV/bin/gunicorn" signing_service.wsgi:application -c deploy/gunicorn.conf.py \
  --bind "$HOST:$PORT" &
pids+=($!)
wait "$!"
