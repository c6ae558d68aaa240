"""JSON errors for the API: bad input is a 4xx with a message, never a 500.

:func:`api_view` wraps every view: it answers methods the view does not take
with 405, malformed or invalid input with 400 and unknown objects with 404,
each as ``{"error": "<a sentence>"}``. The ``handler*`` functions do the same
for URLs that match no view (``demosite/urls.py`` installs them).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse

logger = logging.getLogger("blog")

View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


class ApiError(Exception):
    """An error the client caused: answered with ``status`` and ``message``."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    """Malformed or invalid input (400)."""


class NotFound(ApiError):
    """An id or name that matches nothing (404)."""

    status = 404


def error_response(status: int, message: str) -> JsonResponse:
    """Return ``{"error": message}`` with ``status``."""
    return JsonResponse({"error": message}, status=status)


def api_view(*methods: str) -> Callable[[View], View]:
    """Accept ``methods`` only and turn client errors into JSON 4xx responses.

    Example::

        @api_view("GET")
        async def post_detail(request, pk): ...
    """

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def inner(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if request.method not in methods:
                response = error_response(
                    405, f"Method {request.method} is not allowed here; use {' or '.join(methods)}."
                )
                response["Allow"] = ", ".join(methods)
                return response
            try:
                return await view(request, *args, **kwargs)
            except ApiError as exc:
                return error_response(exc.status, exc.message)
            except (Http404, ObjectDoesNotExist) as exc:
                return error_response(404, _not_found_message(exc))

        return inner

    return decorate


def _not_found_message(exc: Exception) -> str:
    message = str(exc)
    # aget_object_or_404's message ("No Post matches the given query.") is fine;
    # Django's default 404 text is not a sentence about the object.
    return message if message.endswith(".") else "No such object."


def parse_json(request: HttpRequest) -> dict[str, Any]:
    """Return the request's JSON object body; raise :class:`BadRequest` otherwise."""
    if not request.body:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        data = json.loads(request.body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("The request body is not UTF-8 encoded JSON.") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}."
        ) from None
    if not isinstance(data, dict):
        raise BadRequest(f"The request body must be a JSON object, not {type(data).__name__}.")
    return data


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler400``: a JSON 400."""
    return error_response(400, "Bad request.")


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: a JSON 404 for URLs that match no view."""
    return error_response(404, f"No endpoint at {request.path!r}; GET / lists them.")


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: a JSON 500 (a bug in the demo, not bad input)."""
    return error_response(500, "Internal server error.")
