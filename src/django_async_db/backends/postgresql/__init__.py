"""Django's postgresql backend with async I/O inside the django-async-db bridge."""
