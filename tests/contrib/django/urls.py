"""URLs of the test project: the admin and the example project's views."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("analyses.urls")),
]
