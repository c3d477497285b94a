from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from signing_service.api import audit, views

app_name = "api-v1"

urlpatterns = [
    path("signing-requests/", views.SigningRequestCreateView.as_view(), name="signing-requests"),
    path(
        "signing-requests/<uuid:pk>/",
        views.SigningRequestDetailView.as_view(),
        name="signing-request",
    ),
    path(
        "signing-requests/<uuid:pk>/bundle",
        views.SigningRequestBundleView.as_view(),
        name="signing-request-bundle",
    ),
    path(
        "signing-requests/<uuid:pk>/provenance",
        views.SigningRequestProvenanceView.as_view(),
        name="signing-request-provenance",
    ),
    path(
        "signing-requests/<uuid:pk>/approvals/",
        views.ApprovalCreateView.as_view(),
        name="signing-request-approvals",
    ),
    path("signatures/", views.SignatureListView.as_view(), name="signatures"),
    path(
        "signatures/<int:pk>/bundle", views.SignatureBundleView.as_view(), name="signature-bundle"
    ),
    path("verify/", views.VerifyView.as_view(), name="verify"),
    path(
        "oci-signing-requests/",
        views.OciSigningRequestCreateView.as_view(),
        name="oci-signing-requests",
    ),
    path("keys/", views.KeyListView.as_view(), name="keys"),
    path("keys/<str:hint>.pem", views.KeyPemView.as_view(), name="key-pem"),
    path("schema/", SpectacularAPIView.as_view(api_version="1"), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-v1:schema"), name="docs"),
    path("trust/", views.TrustDocumentView.as_view(), name="trust"),
    path(
        "audit/checkpoints/",
        audit.AuditCheckpointListView.as_view(),
        name="audit-checkpoints",
    ),
    path(
        "audit/checkpoints/<int:number>.json",
        audit.AuditCheckpointEnvelopeView.as_view(),
        name="audit-checkpoint-envelope",
    ),
]
