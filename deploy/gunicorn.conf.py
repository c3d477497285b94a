"""gunicorn settings for the signing service (used by `make run` and the container image)."""

import multiprocessing
import os

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
