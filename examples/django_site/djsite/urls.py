from django.contrib import admin
from django.urls import path

from reports import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("reports/", views.create_report, name="create-report"),
    path("reports/<int:report_id>/", views.report_status, name="report"),
]
