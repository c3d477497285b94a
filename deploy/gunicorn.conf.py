"""gunicorn settings for the signing service (used by `make run` and the container image)."""

import multiprocessing
import os
from pathlib import Path

# Sync workers: each process opens its own PKCS#11 session after fork (never before it).
workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count())))
worker_class = "sync"
preload_app = False
timeout = 60
graceful_timeout = 30
max_requests = 0
accesslog = "-"
errorlog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

# Prometheus multiprocess mode (signing_service/metrics.py): every worker writes its counters
# to files in this directory and /metrics sums them, whichever worker answers. It must be in
# the environment before any worker imports prometheus_client. A launcher that sets it (run.sh,
# a container with an emptyDir) empties it before starting the processes that share it;
# otherwise the directory is gunicorn's own and is emptied here when the master starts.
_METRICS_DIR_INHERITED = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
if not _METRICS_DIR_INHERITED:
    _var = Path(os.environ.get("VAR_DIR") or Path(__file__).resolve().parent.parent / "var")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_var.resolve() / "prometheus")


def on_starting(server):
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    if not _METRICS_DIR_INHERITED:
        for stale in path.glob("*.db"):  # counts of a previous run's processes
            stale.unlink()


def child_exit(server, worker):
    # Drops a dead worker's live-gauge files; its counters stay (they are totals so far).
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
