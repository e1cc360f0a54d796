"""URLconf of the preferences tests: a page with the subscription table in a form, as a project
would write it with django-sitemessage's toolbox (imported from the ``sitemessage`` facade).

``/prefs/`` shows every subscribable pair; ``/prefs/filtered/`` the same through
``message_filter``, ``messenger_filter`` and ``new_messengers_titles``. ``?template=bootstrap``
renders the Bootstrap table. A POST stores the ticked boxes and redirects to ``?saved=0|1``.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template import engines
from django.urls import path

from sitemessage.toolbox import get_user_preferences_for_ui, set_user_preferences_from_request

TEMPLATES = {
    "bootstrap": "sitemessage/user_prefs_table-bootstrap.html",
    "plain": "sitemessage/user_prefs_table.html",
}

PAGE = engines["django"].from_string(
    """{% load sitemessage %}<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Subscriptions</title></head>
<body>
<form method="post">{% csrf_token %}
{% sitemessage_prefs_table from prefs template table %}
<button type="submit">Save</button>
</form>
{% if saved %}<p role="status">Saved: {{ saved }}</p>{% endif %}
</body></html>"""
)


def prefs_page(request: HttpRequest, **options: Any) -> HttpResponse:
    """The table of the current user, anonymous or not; a POST stores it, then redirects to
    ``?saved=`` and what set_user_preferences_from_request() returned."""
    if request.method == "POST":
        saved = set_user_preferences_from_request(request)
        return HttpResponseRedirect(f"{request.path}?saved={int(saved)}")
    context = {
        "prefs": get_user_preferences_for_ui(request.user, **options),
        "table": TEMPLATES[request.GET.get("template", "plain")],
        "saved": request.GET.get("saved", ""),
    }
    return HttpResponse(PAGE.render(context, request))


urlpatterns = [
    path("prefs/", prefs_page, name="prefs"),
    path(
        "prefs/filtered/",
        prefs_page,
        {
            "message_filter": lambda message_type: message_type.get_alias() != "alerts",
            "messenger_filter": lambda messenger: messenger.alias != "chat",
            "new_messengers_titles": {"mail": "<i>Mail</i> & more"},
        },
        name="prefs-filtered",
    ),
]
