from django.urls import path

from approvals import resign_views, views

app_name = "approvals"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("history/", views.history, name="history"),
    path("requests/<uuid:pk>/", views.request_detail, name="request"),
    path("requests/<uuid:pk>/decide", views.decide_view, name="decide"),
    path("account/authenticator/", views.otp_setup, name="otp-setup"),
    path("resign-batches/<uuid:pk>/", resign_views.batch_detail, name="resign-batch"),
    path("resign-batches/<uuid:pk>/decide", resign_views.batch_decide, name="resign-batch-decide"),
]
