from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from signing_service.api.errors import api_not_found


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("api/v1/", include("signing_service.api.urls")),
    path("healthz", healthz, name="healthz"),
]


def handler404(request: HttpRequest, exception: Exception) -> JsonResponse:
    return api_not_found(request, exception)
