"""The views behind the links in messages: unsubscribe and mark read, at django-sitemessage's
URLs and names (attach them with ``get_sitemessage_urls()``).

Unsubscribing asks first: GET shows a confirmation page and only POST changes anything, so a
mail scanner that follows links unsubscribes nobody. A POST needs no CSRF token: RFC 8058
one-click unsubscribe (``List-Unsubscribe-Post``) posts from the mail client, and the signed
link is the credential. Marking read changes only the dispatch's read status. Both answer an
invalid or expired link without saying why, and send the ``*_failed`` signal.
"""

from __future__ import annotations

import base64
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import render
from django.urls import URLPattern, re_path
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt

from . import links
from .messages import MessageBase
from .models import Dispatch
from .signals import sig_mark_read_failed, sig_unsubscribe_failed
from .types import get_registered_message_type

#: A transparent 1x1 GIF: the read-tracking pixel.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
#: The body of an RFC 8058 one-click unsubscribe POST.
ONE_CLICK = "List-Unsubscribe=One-Click"


@csrf_exempt
@never_cache
def unsubscribe(
    request: HttpRequest,
    message_id: str,
    dispatch_id: str,
    hashed: str,
    redirect_to: str | None = None,
) -> HttpResponse:
    """GET: the confirmation page; POST (the page's button, or one-click): unsubscribes."""
    if request.method not in ("GET", "HEAD", "POST"):
        return HttpResponseNotAllowed(["GET", "POST"])
    link = _link("unsubscribe", message_id, dispatch_id, hashed)
    if link is None:
        sig_unsubscribe_failed.send(None, request=request, message=message_id, dispatch=dispatch_id)
        return render(request, "sitemessage/unsubscribe.html", {"state": "invalid"}, status=400)
    message_type = _message_type(link)
    if request.method != "POST":
        return render(
            request,
            "sitemessage/unsubscribe.html",
            {"state": "confirm", "title": message_type.title, "action": request.path},
        )
    message, dispatch = _rows(link)
    request.sitemessage_link = link  # type: ignore[attr-defined]
    response = message_type.handle_unsubscribe_request(
        request, message, dispatch, hash_is_valid=True, redirect_to=redirect_to
    )
    if response is not None:
        return response
    if request.POST.get("List-Unsubscribe") == "One-Click":
        return HttpResponse("Unsubscribed.\n", content_type="text/plain; charset=utf-8")
    return render(
        request, "sitemessage/unsubscribe.html", {"state": "done", "title": message_type.title}
    )


@never_cache
def mark_read(
    request: HttpRequest,
    message_id: str,
    dispatch_id: str,
    hashed: str,
    redirect_to: str | None = None,
) -> HttpResponse:
    """Marks the link's dispatch read; answers with a transparent pixel (or ``redirect_to``)."""
    link = _link("mark_read", message_id, dispatch_id, hashed)
    if link is None:
        sig_mark_read_failed.send(None, request=request, message=message_id, dispatch=dispatch_id)
    else:
        message, dispatch = _rows(link)
        request.sitemessage_link = link  # type: ignore[attr-defined]
        response = _message_type(link).handle_mark_read_request(
            request, message, dispatch, hash_is_valid=True, redirect_to=redirect_to
        )
        if response is not None:
            return response
    return HttpResponse(PIXEL, content_type="image/gif")


def _link(
    purpose: links.Purpose, message_id: str, dispatch_id: str, token: str
) -> links.Link | None:
    """What a link's token says, when it is valid and for the ids in its path."""
    link = links.read_token(purpose, token)
    if link is None or (str(link.message_id), str(link.dispatch_id)) != (message_id, dispatch_id):
        return None
    return link


def _message_type(link: links.Link) -> type[MessageBase]:
    """The link's message type; one no longer registered is handled by MessageBase's code."""
    try:
        return get_registered_message_type(link.message_type)
    except LookupError:
        return MessageBase


def _rows(link: links.Link) -> tuple[Any, Any]:
    """The link's Message and Dispatch rows, or their ids when cleaned up since."""
    dispatch = (
        Dispatch.objects.select_related("message")
        .filter(pk=link.dispatch_id, message_id=link.message_id)
        .first()
    )
    if dispatch is None:
        return link.message_id, link.dispatch_id
    return dispatch.message, dispatch


def get_sitemessage_urls() -> list[URLPattern]:
    """The URL patterns of the links in messages, to add to a project's urlpatterns:
    ``urlpatterns += get_sitemessage_urls()``."""
    return [
        re_path(
            r"^messages/unsubscribe/(?P<message_id>\d+)/(?P<dispatch_id>\d+)/(?P<hashed>[^/]+)/$",
            unsubscribe,
            name=links.URL_NAMES["unsubscribe"],
        ),
        re_path(
            r"^messages/ping/(?P<message_id>\d+)/(?P<dispatch_id>\d+)/(?P<hashed>[^/]+)/$",
            mark_read,
            name=links.URL_NAMES["mark_read"],
        ),
    ]
