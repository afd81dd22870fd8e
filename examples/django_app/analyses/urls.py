"""URLs of the analyses app."""

from django.urls import path

from . import views

app_name = "analyses"
urlpatterns = [
    path("analyses/", views.index, name="index"),
    path("analyses/start/", views.start, name="start"),
    path("analyses/<int:pk>/", views.detail, name="detail"),
    path("analyses/<int:pk>/delete/", views.delete, name="delete"),
]
