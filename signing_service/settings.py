"""The one settings module. Every value comes from the environment through typed helpers.

``MODELSIGN_ENV=production`` turns on the production posture (no DEBUG, secure cookies,
HSTS, a required SECRET_KEY); anything else is the embedded local default, whose state
lives under ``VAR_DIR`` (default ``./var``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from signing_service.env import (
    database_from_url,
    env_bool,
    env_int,
    env_list,
    env_path,
    env_secret,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
MODELSIGN_ENV = env_str("MODELSIGN_ENV", "local")
if MODELSIGN_ENV not in ("local", "test", "production"):
    raise ImproperlyConfigured(
        f"MODELSIGN_ENV must be local, test or production, got {MODELSIGN_ENV!r}"
    )
PRODUCTION = MODELSIGN_ENV == "production"
VAR_DIR = env_path("VAR_DIR", BASE_DIR / "var").resolve()


def _secret_key() -> str:
    key = env_secret("SECRET_KEY")
    if key:
        if PRODUCTION and len(key) < 50:
            raise ImproperlyConfigured("SECRET_KEY must be at least 50 characters in production")
        return key
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set in production")
    # Local only: a random key kept under VAR_DIR so sessions survive restarts.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(64))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [] if PRODUCTION else ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
#: Public base URL used in links handed to CI jobs and emails; empty means "from the request".
PUBLIC_URL = env_str("PUBLIC_URL", "").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "signing_service.apps.SigningServiceConfig",
    "keys.apps.KeysConfig",
    "approvals.apps.ApprovalsConfig",
    "provenance.apps.ProvenanceConfig",
]

MIDDLEWARE = [
    # Outermost: the request id and the request counter see every answer, redirects included.
    "signing_service.observability.RequestObservabilityMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "signing_service.urls"
WSGI_APPLICATION = "signing_service.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "keys.context_processors.roles",
            ]
        },
    }
]

DATABASES = {
    "default": database_from_url(
        env_secret("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}", base_dir=BASE_DIR
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = False
STATIC_URL = "static/"
STATIC_ROOT = env_path("STATIC_ROOT", VAR_DIR / "static")

# --- security posture ------------------------------------------------------------------
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "approvals:dashboard"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600, minimum=300)
OTP_TOTP_ISSUER = env_str("OTP_TOTP_ISSUER", "modelsign")
#: An approve/reject needs an authenticator code verified at most this long ago.
APPROVAL_OTP_MAX_AGE_SECONDS = env_int("APPROVAL_OTP_MAX_AGE_SECONDS", 300, minimum=30, maximum=900)
#: Revocation incidents are POSTed here (JSON) with an HMAC-SHA256 signature header.
INCIDENT_WEBHOOK_URL = env_str("INCIDENT_WEBHOOK_URL", "")
INCIDENT_WEBHOOK_SECRET = env_secret("INCIDENT_WEBHOOK_SECRET", "") or ""
#: A key ceremony must reach its quorum within this many minutes of being opened.
CEREMONY_TTL_MINUTES = env_int("CEREMONY_TTL_MINUTES", 30, minimum=5, maximum=24 * 60)
EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend"
    if PRODUCTION
    else "django.core.mail.backends.console.EmailBackend",
)
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1, maximum=65535)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_secret("EMAIL_HOST_PASSWORD", "") or ""
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", PRODUCTION)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "modelsign@localhost")

# --- the signing service ---------------------------------------------------------------
SIGNING_POLICY_FILE = env_path("SIGNING_POLICY_FILE", BASE_DIR / "deploy" / "local" / "policy.yaml")
#: Largest accepted API request body; larger bodies get 413 before they are read.
MAX_REQUEST_BODY_BYTES = env_int("MAX_REQUEST_BODY_BYTES", 16 * 1024 * 1024, minimum=1024)
MAX_RESOURCES = env_int("MAX_RESOURCES", 100_000, minimum=1)
MAX_JSON_DEPTH = env_int("MAX_JSON_DEPTH", 16, minimum=4, maximum=64)
#: Largest SLSA provenance statement a signing request may carry (canonical JSON bytes).
MAX_PROVENANCE_BYTES = env_int("MAX_PROVENANCE_BYTES", 256 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES
#: CI OIDC authentication (signing_service/oidc_config.py, docs/ci-oidc.md): a YAML file of
#: trusted issuers, their audience and identity templates, and the authorities that refuse
#: API tokens. Empty: OIDC is off and only API tokens authenticate.
OIDC_CONFIG_FILE = env_str("OIDC_CONFIG_FILE", "")
API_TOKEN_DEFAULT_DAYS = env_int("API_TOKEN_DEFAULT_DAYS", 90, minimum=1, maximum=3650)

PKCS11_MODULE = env_str("PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
#: Token label per authority: PKCS11_TOKEN_<AUTHORITY>, default ``modelsign-<authority>``.
#: PIN per authority: PKCS11_PIN_FILE_<AUTHORITY>, else PKCS11_PIN_FILE.
PKCS11_PIN_FILE = env_path("PKCS11_PIN_FILE", VAR_DIR / "softhsm" / "user.pin")
SOFTHSM_DIR = env_path("SOFTHSM_DIR", VAR_DIR / "softhsm")
#: The audit checkpoint key (signing_service.audit_checkpoints) signs nothing but audit
#: checkpoints, on a PKCS#11 token of its own with its own PIN file (same PKCS11_MODULE).
AUDIT_CHECKPOINT_TOKEN = env_str("AUDIT_CHECKPOINT_TOKEN", "modelsign-audit-checkpoint")
AUDIT_CHECKPOINT_PIN_FILE = env_path(
    "AUDIT_CHECKPOINT_PIN_FILE", VAR_DIR / "softhsm" / "audit-checkpoint.pin"
)
AUDIT_CHECKPOINT_KEY_ALGORITHM = env_str("AUDIT_CHECKPOINT_KEY_ALGORITHM", "ECDSA-P256")
if AUDIT_CHECKPOINT_KEY_ALGORITHM not in ("ECDSA-P256", "ECDSA-P384", "ECDSA-P521"):
    raise ImproperlyConfigured(
        "AUDIT_CHECKPOINT_KEY_ALGORITHM must be ECDSA-P256, ECDSA-P384 or ECDSA-P521, "
        f"got {AUDIT_CHECKPOINT_KEY_ALGORITHM!r}"
    )
#: A new checkpoint key is valid this long; checkpoints it signed stay verifiable after that.
AUDIT_CHECKPOINT_KEY_DAYS = env_int("AUDIT_CHECKPOINT_KEY_DAYS", 730, minimum=1, maximum=3650)
#: How often the worker's beat signs the audit log's head (nothing is signed if it did not move).
AUDIT_CHECKPOINT_INTERVAL_SECONDS = env_int(
    "AUDIT_CHECKPOINT_INTERVAL_SECONDS", 3600, minimum=60, maximum=7 * 86400
)
#: Vault transit: token from VAULT_TOKEN_FILE, or AppRole (VAULT_ROLE_ID + VAULT_SECRET_ID_FILE).
#: Transit key per authority: VAULT_KEY_<AUTHORITY>, default ``modelsign-<authority>``.
VAULT_ADDR = env_str("VAULT_ADDR", "")
VAULT_TRANSIT_MOUNT = env_str("VAULT_TRANSIT_MOUNT", "transit")
VAULT_CACERT = env_str("VAULT_CACERT", "")
VAULT_ROLE_ID = env_str("VAULT_ROLE_ID", "")
#: Key ceremonies (create, rotate, raise min_encryption_version) use their own credential when
#: one is set: VAULT_CEREMONY_TOKEN_FILE, or AppRole VAULT_CEREMONY_ROLE_ID +
#: VAULT_CEREMONY_SECRET_ID_FILE; given only to the web and the key_ceremony runner.
VAULT_CEREMONY_ROLE_ID = env_str("VAULT_CEREMONY_ROLE_ID", "")
#: Keyless authorities: a private Sigstore instance's ClientTrustConfig JSON, or public-good.
SIGSTORE_TRUST_CONFIG = env_str("SIGSTORE_TRUST_CONFIG", "")
SIGSTORE_STAGING = env_bool("SIGSTORE_STAGING", False)

# --- background work (Celery on Redis; see worker/celery.py) ----------------------------
#: ``worker`` hands approved requests to the Celery worker (production default, and what
#: ``make run`` uses); ``inline`` signs in the HTTP request that approves it (tests, and
#: setups without a worker: then nothing retries a request waiting for its key).
SIGNING_MODE = env_str("SIGNING_MODE", "worker" if PRODUCTION else "inline")
if SIGNING_MODE not in ("inline", "worker"):
    raise ImproperlyConfigured(f"SIGNING_MODE must be inline or worker, got {SIGNING_MODE!r}")
#: An approved request nobody signed for this long is enqueued again by the reconciler.
RECONCILE_AFTER_SECONDS = env_int("RECONCILE_AFTER_SECONDS", 120, minimum=0)
#: A request this long in ``signing`` lost its worker: it goes back to ``approved``.
#: Keep it well above CELERY_TASK_TIME_LIMIT so a live (slow) worker is never overtaken.
STUCK_SIGNING_SECONDS = env_int("STUCK_SIGNING_SECONDS", 300, minimum=0)
#: A running re-sign batch with no progress for this long is sent to the worker again.
#: Keep it well above the resign_chunk time limit (150 s) so a live worker is not overtaken.
RESIGN_STALL_SECONDS = env_int("RESIGN_STALL_SECONDS", 300, minimum=0)
#: How often beat runs the key rotation job (keys.rotation): ceremonies, retirements, re-signs.
ROTATION_CHECK_SECONDS = env_int("ROTATION_CHECK_SECONDS", 3600, minimum=60, maximum=86400)
CELERY_BROKER_URL = env_secret("REDIS_URL") or "redis://127.0.0.1:6379/0"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
#: Where spent OIDC token ids (jti) are kept until the tokens expire; the broker by default.
OIDC_REDIS_URL = env_secret("OIDC_REDIS_URL") or CELERY_BROKER_URL
# Redelivers a message whose worker died without acking it after this long (Redis has no
# per-consumer ack); the reconciler catches such requests much sooner.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600, minimum=60)
}
# Ack after the task ran and take one message at a time: a killed worker's message is
# redelivered, and a worker never hoards messages another could run.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True  # state lives in the database; no result backend
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 60, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 90, minimum=1)
CELERY_TASK_DEFAULT_QUEUE = "signing"
CELERY_TASK_CREATE_MISSING_QUEUES = False
CELERY_TASK_QUEUES = {
    name: {"exchange": name, "routing_key": name} for name in ("signing", "maintenance")
}
# Work that uses a signing key runs on "signing"; everything else (sweeps, notices) on
# "maintenance". Globs, first match wins: name new key-using tasks sign_* or resign_*.
CELERY_TASK_ROUTES = {
    "worker.tasks.*.sign_*": {"queue": "signing"},
    "worker.tasks.*.resign_*": {"queue": "signing"},
    "worker.tasks.*": {"queue": "maintenance"},
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "signing_service.api.oidc.OidcAuthentication",
        "signing_service.api.auth.ApiTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["signing_service.api.parsers.StrictJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "signing_service.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Model signing service API",
    "DESCRIPTION": "Sign ML model manifests with HSM-held keys; OpenSSF model signing bundles.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "RequestStateEnum": "signing_service.models.RequestState",
        "KeyStateEnum": "keys.models.KeyState",
    },
}

# --- observability (signing_service.observability, .health, .metrics, .logs) -------------
#: ``json``: one JSON object per line (time, level, logger, message, request_id, extras);
#: ``text``: one readable line. Both carry the request id, in web and worker processes alike.
LOG_FORMAT = env_str("LOG_FORMAT", "json" if PRODUCTION else "text")
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, got {LOG_FORMAT!r}")
#: Bearer token for GET /metrics; unset, /metrics answers only direct loopback connections.
METRICS_TOKEN = env_secret("METRICS_TOKEN", "") or ""
#: /readyz: each dependency must answer within this many seconds ...
READYZ_TIMEOUT_SECONDS = env_int("READYZ_TIMEOUT_SECONDS", 2, minimum=1, maximum=30)
#: ... and a key backend's health() answer is reused this long (probes never hammer an HSM).
READYZ_CACHE_SECONDS = env_int("READYZ_CACHE_SECONDS", 5, minimum=0, maximum=300)
# Multiprocess metrics (see signing_service/metrics.py): the launchers set the variable
# (deploy/gunicorn.conf.py, deploy/local/run.sh); every process writing there needs the dir.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
    # prometheus_client takes an empty value for "the current directory": mean "unset".
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    try:
        Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR: {exc}") from None


def _worker_metrics_listen() -> tuple[str, int] | None:
    raw = env_str("WORKER_METRICS_LISTEN", "").strip()
    if not raw:
        return None
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ImproperlyConfigured(
            f"WORKER_METRICS_LISTEN must be host:port (e.g. 0.0.0.0:9808), got {raw!r}"
        )
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise ImproperlyConfigured(
            "WORKER_METRICS_LISTEN needs PROMETHEUS_MULTIPROC_DIR: the pool processes that "
            "sign write their metrics there for the worker's endpoint to add up"
        )
    return host.strip("[]"), int(port)


#: A Celery worker with a metrics directory of its own (another pod) serves its signing
#: latencies at http://host:port/metrics; unset, the web's /metrics shows them (shared dir).
WORKER_METRICS_LISTEN = _worker_metrics_listen()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_context": {"()": "signing_service.logs.RequestContextFilter"}},
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "signing_service.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_context"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# The SoftHSM library reads SOFTHSM2_CONF when it is loaded; point it at the local tokens.
if "SOFTHSM2_CONF" not in os.environ and (SOFTHSM_DIR / "softhsm2.conf").exists():
    os.environ["SOFTHSM2_CONF"] = str(SOFTHSM_DIR / "softhsm2.conf")
