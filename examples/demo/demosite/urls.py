"""The demo project's URLs: the blog API at the root, JSON error handlers."""

from __future__ import annotations

from django.urls import include, path

urlpatterns = [path("", include("blog.urls"))]

handler400 = "blog.errors.bad_request"
handler404 = "blog.errors.not_found"
handler500 = "blog.errors.server_error"
