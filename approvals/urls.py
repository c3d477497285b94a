from django.urls import path

from approvals import views

app_name = "approvals"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("history/", views.history, name="history"),
    path("requests/<uuid:pk>/", views.request_detail, name="request"),
    path("requests/<uuid:pk>/decide", views.decide_view, name="decide"),
    path("account/authenticator/", views.otp_setup, name="otp-setup"),
]
