"""App config of the demo's blog app."""

from __future__ import annotations

from django.apps import AppConfig


class BlogConfig(AppConfig):
    """The blog app (label ``blog``)."""

    name = "blog"
    default_auto_field = "django.db.models.BigAutoField"
