"""URLs of the test project: the admin, the test app's views and the example project's."""

from django.contrib import admin
from django.urls import include, path

from .testapp import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("testapp/<int:pk>/cancel/", views.cancel),
    path("testapp/<int:pk>/cancel-and-wait/", views.cancel_and_wait),
    path("", include("analyses.urls")),
]
