"""Settings and URLconf for ``bench/bench_api.py`` only: the project's settings and URLs,
plus one trivial DRF endpoint (the reference) that is never mounted in the service itself.

``DJANGO_SETTINGS_MODULE=bench_api_site`` (with ``bench/`` on ``PYTHONPATH``): everything
is ``signing_service.settings`` (same middleware, authentication classes, renderer, database)
except ``ROOT_URLCONF``, which is this module: the project's ``urlpatterns`` and
``POST /bench/trivial/``.
"""

from __future__ import annotations

from typing import Any

from signing_service.settings import *  # noqa: F403

ROOT_URLCONF = "bench_api_site"


def _urlpatterns() -> list[Any]:
    from django.urls import path
    from rest_framework.request import Request
    from rest_framework.response import Response
    from rest_framework.views import APIView

    from signing_service import urls

    class TrivialView(APIView):
        """Authenticated like the API (same classes), does nothing, answers tiny JSON."""

        def post(self, request: Request) -> Response:
            return Response({"ok": True})

    return [path("bench/trivial/", TrivialView.as_view()), *urls.urlpatterns]


def __getattr__(name: str) -> Any:
    # The URL patterns are built on first use by the URL resolver (apps are ready by then);
    # building them at import would import views while settings are being read.
    if name == "urlpatterns":
        patterns = _urlpatterns()
        globals()["urlpatterns"] = patterns
        return patterns
    if name in ("handler404",):
        from signing_service import urls

        return urls.handler404
    raise AttributeError(name)
