"""Database backends of django-async-db."""
