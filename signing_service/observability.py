"""``/healthz``, ``/readyz``, ``/metrics`` and the middleware that ids and counts requests.

* ``/healthz``: the process is alive and answers; it touches no dependency (liveness).
* ``/readyz``: database, broker, policy and each active key's backend
  (:mod:`signing_service.health`); 200 with every check, or 503 naming what failed.
* ``/metrics``: Prometheus text format (:mod:`signing_service.metrics`). With
  ``METRICS_TOKEN`` (or ``METRICS_TOKEN_FILE``) set, it needs ``Authorization: Bearer
  <token>``; without, it answers only direct loopback connections (no proxy headers), so a
  default install never publishes authority names and queue sizes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from signing_service import health, logs, metrics

_LOOPBACK = frozenset({"127.0.0.1", "::1"})
_PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


class RequestObservabilityMiddleware:
    """Outermost middleware: a request id for every log line, and ``http_requests_total``.

    The id is the caller's ``X-Request-ID`` if it is sane (else a fresh one); it is returned
    in the response's ``X-Request-ID`` and handed to Celery tasks published meanwhile.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = logs.accept_request_id(request.headers.get(logs.HTTP_HEADER))
        # Not reset on the way out: Django logs 4xx/5xx answers ("Not Found: ...") after the
        # middleware returns. request_finished clears it (logs._forget_request_id_after).
        logs.request_id_var.set(request_id)
        response = self.get_response(request)
        response[logs.HTTP_HEADER] = request_id
        metrics.count_request(_endpoint(request), request.method or "", response.status_code)
        return response


def _endpoint(request: HttpRequest) -> str:
    """The route's name (``api-v1:signing-request``), else its pattern; never the raw path."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unrouted"  # no route matched (404), or a middleware answered first (redirects)
    if match.url_name:
        return str(match.view_name)
    return str(match.route) or "unrouted"


@require_safe
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_safe
@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    checks = health.run_checks()
    failed = [c.name for c in checks if not c.ok]
    body = {
        "status": "unavailable" if failed else "ok",
        "failed": failed,
        "checks": {c.name: c.to_json() for c in checks},
    }
    return JsonResponse(body, status=503 if failed else 200)


@require_safe
@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    refusal = _metrics_refusal(request)
    if refusal is not None:
        return refusal
    body, content_type = metrics.exposition()
    return HttpResponse(body, content_type=content_type)


def _metrics_refusal(request: HttpRequest) -> HttpResponse | None:
    expected = settings.METRICS_TOKEN
    if expected:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            return None
        response = _plain(401, "metrics need Authorization: Bearer <METRICS_TOKEN>")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    direct = not any(request.META.get(h) for h in _PROXY_HEADERS)
    if request.META.get("REMOTE_ADDR") in _LOOPBACK and direct:
        return None
    return _plain(
        403,
        "metrics answer only direct loopback connections; set METRICS_TOKEN (or "
        "METRICS_TOKEN_FILE) to let Prometheus scrape from elsewhere with a bearer token",
    )


def _plain(status: int, message: str) -> HttpResponse:
    return HttpResponse(message + "\n", status=status, content_type="text/plain; charset=utf-8")
