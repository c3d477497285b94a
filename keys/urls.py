from django.urls import path

from keys import views

app_name = "keys"

urlpatterns = [
    path("", views.keys_page, name="custodian"),
    path("ceremonies/open", views.open_view, name="ceremony-open"),
    path("ceremonies/<uuid:pk>/confirm", views.confirm_view, name="ceremony-confirm"),
    path("ceremonies/<uuid:pk>/abort", views.abort_view, name="ceremony-abort"),
    path("keys/<int:pk>/revoke", views.revoke_view, name="revoke"),
    path("incidents/<uuid:pk>/", views.incident_page, name="incident"),
    path("audit/", views.audit_page, name="audit"),
]
