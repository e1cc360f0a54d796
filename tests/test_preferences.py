"""The subscription preferences UI (dispatcher/preferences.py, the ``sitemessage_prefs_table``
tag and its templates), through Django's test client on the page of tests/prefs_urls.py and
the real test database: what the table offers and shows ticked, what a post stores, which
posts are refused with 400 before anything changes, and that choosing a pair again lifts the
user's opt-out. Last, the same page in headless chromium (tests/browser.py)."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import pytest
from django.core.exceptions import BadRequest
from django.template import Context, Template, TemplateSyntaxError
from django.test import RequestFactory

import sitemessage.toolbox as sm_toolbox
from dispatcher import preferences, types
from dispatcher.messages import MessageBase, register_message_types
from dispatcher.models import OptOut, Subscription, address_digest
from messengers import registry
from messengers.base import MessengerBase
from messengers.exceptions import SiteMessageConfigurationError

pytestmark = [pytest.mark.urls("tests.prefs_urls"), pytest.mark.usefixtures("prefs_world")]


class Messenger(MessengerBase):
    def send(self, message_cls, message_model, dispatch_models):
        for dispatch in dispatch_models:
            self.mark_sent(dispatch)


class Mail(Messenger):
    alias, title = "mail", "E-mail"


class Chat(Messenger):
    alias, title = "chat", "Chat"


class Pager(Messenger):
    alias, title = "pager", "Pager"
    allow_user_subscription = False


class News(MessageBase):
    alias, title = "news", "News"


class Digest(MessageBase):
    """Shares News's title: one row."""

    alias, title, supported_messengers = "digest", "News", ["mail"]


class Alerts(MessageBase):
    alias, title, supported_messengers = "alerts", "Alerts", ["chat"]


class Internal(MessageBase):
    alias, title = "internal", "Internal"
    allow_user_subscription = False


@pytest.fixture
def prefs_world(registries) -> None:
    """Exactly these messengers and message types are registered during a test."""
    registry._registry.clear()
    registry.register_messenger_objects(Mail(), Chat(), Pager())
    types._message_types.clear()
    register_message_types(News, Digest, Alerts, Internal)


@pytest.fixture
def user(django_user_model) -> Any:
    return django_user_model.objects.create_user("ann", "ann@example.com", "pw")


class Checkboxes(HTMLParser):
    """The page's checkboxes: value -> (checked, accessible name, class)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.boxes: dict[str, tuple[bool, str, str]] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("type") == "checkbox":
            assert a["name"] == "sm_user_pref"
            self.boxes[a["value"] or ""] = (
                "checked" in a,
                a["aria-label"] or "",
                a.get("class") or "",
            )


def subscriptions(user) -> set[tuple[str, str]]:
    return set(Subscription.get_for_user(user).values_list("message_cls", "messenger_cls"))


def subscribe(user, *pairs: str) -> None:
    for pair in pairs:
        Subscription.create(user, *pair.split("|"))


@pytest.mark.django_db
def test_table_offers_subscribable_supported_pairs_and_ticks_subscriptions(client, user):
    subscribe(user, "alerts|chat", "news|chat")
    client.force_login(user)

    response = client.get("/prefs/")

    assert response.status_code == 200
    # Pager and Internal do not allow user subscription; Digest shares News's row, and is the
    # mail cell of that row (first by alias); Alerts is not sent by e-mail.
    assert response.context["prefs"] == (
        ["Chat", "E-mail"],
        {
            "Alerts": [("alerts|chat", True, True), ("", False, False)],
            "News": [("news|chat", True, True), ("digest|mail", True, False)],
        },
    )
    assert Checkboxes(response.content.decode()).boxes == {
        "alerts|chat": (True, "Alerts: Chat", ""),
        "news|chat": (True, "News: Chat", ""),
        "digest|mail": (False, "News: E-mail", ""),
    }
    assert 'data-pref=""' in response.content.decode()  # the unsupported cell: no checkbox


@pytest.mark.django_db
def test_anonymous_user_sees_the_table_unticked(client):
    response = client.get("/prefs/")

    assert response.status_code == 200
    assert [c[2] for row in response.context["prefs"][1].values() for c in row] == [False] * 4


@pytest.mark.django_db
def test_filters_and_new_titles_shape_the_table_and_titles_are_escaped(client, user):
    client.force_login(user)

    response = client.get("/prefs/filtered/")

    # No Alerts (message_filter), no Chat (messenger_filter), the mail column renamed.
    assert response.context["prefs"] == (
        ["<i>Mail</i> & more"],
        {"News": [("digest|mail", True, False)]},
    )
    html = response.content.decode()
    assert "&lt;i&gt;Mail&lt;/i&gt; &amp; more</th>" in html
    assert "<i>" not in html
    assert Checkboxes(html).boxes["digest|mail"][1] == "News: <i>Mail</i> & more"


@pytest.mark.django_db
def test_a_messenger_no_type_can_use_gets_no_column(user):
    class Fax(Messenger):
        alias, title = "fax", "Fax"

    registry.register_messenger_objects(Fax())

    titles, table = preferences.get_user_preferences_for_ui(
        user, message_filter=lambda t: t.supported_messengers != []
    )

    assert titles == ["Chat", "E-mail"]
    assert table == {
        "Alerts": [("alerts|chat", True, False), ("", False, False)],
        "News": [("", False, False), ("digest|mail", True, False)],
    }


@pytest.mark.django_db
def test_merged_row_cell_is_the_subscribed_type_so_posting_back_keeps_it(client, user):
    subscribe(user, "news|mail")
    client.force_login(user)

    response = client.get("/prefs/")
    boxes = Checkboxes(response.content.decode()).boxes
    assert boxes["news|mail"][0] is True
    assert "digest|mail" not in boxes

    ticked = [value for value, (checked, _, _) in boxes.items() if checked]
    assert client.post("/prefs/", {"sm_user_pref": ticked}).status_code == 302
    assert subscriptions(user) == {("news", "mail")}


@pytest.mark.django_db
def test_post_replaces_the_users_subscriptions(client, user, django_user_model):
    other = django_user_model.objects.create_user("bob")
    subscribe(user, "news|chat")
    subscribe(other, "news|chat")
    client.force_login(user)

    response = client.post("/prefs/", {"sm_user_pref": ["alerts|chat", "digest|mail"]})

    assert (response.status_code, response["Location"]) == (302, "/prefs/?saved=1")
    assert subscriptions(user) == {("alerts", "chat"), ("digest", "mail")}
    assert subscriptions(other) == {("news", "chat")}
    page = client.get(response["Location"])
    assert Checkboxes(page.content.decode()).boxes["digest|mail"][0] is True

    # Nothing ticked: every subscription of the user goes, and nothing was "given".
    response = client.post("/prefs/", {})
    assert response["Location"] == "/prefs/?saved=0"
    assert subscriptions(user) == set()
    assert subscriptions(other) == {("news", "chat")}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("news", "is not '<message type>|<messenger>'"),
        ("news|", "is not '<message type>|<messenger>'"),
        ("|mail", "is not '<message type>|<messenger>'"),
        ("news|mail|chat", "is not '<message type>|<messenger>'"),
        ("nope|mail", "names an unknown message type"),
        ("news|nope", "names an unknown messenger"),
        ("internal|mail", "names a message type users cannot subscribe to"),
        ("news|pager", "names a messenger users cannot subscribe through"),
        ("alerts|mail", "names a message type that is not sent through that messenger"),
    ],
)
def test_a_bad_value_is_refused_with_400_and_changes_nothing(client, user, caplog, value, problem):
    subscribe(user, "news|chat")
    OptOut.objects.create(
        message_cls="digest", messenger_cls="mail", address_digest="d", recipient=user
    )
    client.force_login(user)

    response = client.post("/prefs/", {"sm_user_pref": ["digest|mail", value]})

    assert response.status_code == 400
    assert f"subscription preference {value!r} {problem}" in caplog.text
    assert subscriptions(user) == {("news", "chat")}
    assert OptOut.objects.filter(recipient=user).count() == 1


@pytest.mark.django_db
def test_anonymous_post_is_refused_with_400(client):
    response = client.post("/prefs/", {"sm_user_pref": ["news|mail"]})

    assert response.status_code == 400
    assert Subscription.objects.count() == 0


@pytest.mark.django_db
def test_a_request_that_is_not_a_post_changes_nothing(user):
    subscribe(user, "news|chat")
    request = RequestFactory().get("/prefs/", {"sm_user_pref": "alerts|chat"})
    request.user = user

    assert sm_toolbox.set_user_preferences_from_request(request) is False
    assert subscriptions(user) == {("news", "chat")}


@pytest.mark.django_db
def test_choosing_a_pair_again_lifts_the_users_opt_out_of_it(client, user, django_user_model):
    other = django_user_model.objects.create_user("bob")
    digest = address_digest(user.email)
    OptOut.objects.create(
        message_cls="news", messenger_cls="chat", address_digest=digest, recipient=user
    )
    OptOut.objects.create(
        message_cls="alerts", messenger_cls="chat", address_digest=digest, recipient=user
    )
    OptOut.objects.create(
        message_cls="news", messenger_cls="chat", address_digest="bob", recipient=other
    )
    client.force_login(user)

    assert client.post("/prefs/", {"sm_user_pref": ["news|chat"]}).status_code == 302

    assert subscriptions(user) == {("news", "chat")}
    remaining = OptOut.objects.values_list("recipient__username", "message_cls", "messenger_cls")
    assert set(remaining) == {("ann", "alerts", "chat"), ("bob", "news", "chat")}


@pytest.mark.django_db
def test_bootstrap_template(client, user):
    client.force_login(user)

    html = client.get("/prefs/?template=bootstrap").content.decode()

    assert '<table class="sitemessage_prefs table table-striped">' in html
    assert Checkboxes(html).boxes["news|chat"] == (False, "News: Chat", "form-check-input")


@pytest.mark.parametrize(
    "tag",
    [
        "{% sitemessage_prefs_table %}",
        "{% sitemessage_prefs_table from %}",
        "{% sitemessage_prefs_table prefs %}",
        "{% sitemessage_prefs_table template 'x.html' %}",
        "{% sitemessage_prefs_table from prefs from prefs %}",
        "{% sitemessage_prefs_table from prefs template 'x.html' extra %}",
        "{% sitemessage_prefs_table from prefs with x %}",
    ],
)
def test_tag_notation_errors(tag):
    with pytest.raises(TemplateSyntaxError, match="expects the following notation"):
        Template("{% load sitemessage %}" + tag)


@pytest.mark.parametrize("value", [None, "prefs", ["a", {}], ("a", {}, "c")])
def test_tag_given_something_else_than_the_prefs_tuple(settings, value):
    template = Template("{% load sitemessage %}[{% sitemessage_prefs_table from prefs %}]")

    settings.DEBUG = False
    assert template.render(Context({"prefs": value})) == "[]"
    settings.DEBUG = True
    with pytest.raises(SiteMessageConfigurationError, match="get_user_preferences_for_ui"):
        template.render(Context({"prefs": value}))


def test_tag_renders_a_template_named_by_a_variable():
    template = Template(
        "{% load sitemessage %}{% sitemessage_prefs_table from prefs template name %}"
    )
    prefs = (["Chat"], {"News": [("news|chat", True, True)]})

    html = template.render(Context({"prefs": prefs, "name": "sitemessage/user_prefs_table.html"}))

    assert Checkboxes(html).boxes == {"news|chat": (True, "News: Chat", "")}


def test_facade_exports_the_preferences_functions():
    assert sm_toolbox.get_user_preferences_for_ui is preferences.get_user_preferences_for_ui
    assert (
        sm_toolbox.set_user_preferences_from_request
        is preferences.set_user_preferences_from_request
    )
    assert {"get_user_preferences_for_ui", "set_user_preferences_from_request"} <= set(
        sm_toolbox.__all__
    )
    with pytest.raises(BadRequest):
        preferences.parse_pref("no separator")


@pytest.mark.browser
def test_browser_ticks_and_unticks_boxes_and_saves(browser_page, user):
    subscribe(user, "news|chat")
    OptOut.objects.create(
        message_cls="alerts", messenger_cls="chat", address_digest="a", recipient=user
    )
    browser_page.login(user)

    page = browser_page.goto("/prefs/?template=bootstrap")
    assert page.get_by_label("News: Chat").is_checked()
    assert page.get_by_role("checkbox").count() == 3
    page.get_by_label("News: Chat").uncheck()
    page.get_by_label("Alerts: Chat").check()
    page.get_by_label("News: E-mail").check()
    browser_page.screenshot("ticked")
    page.get_by_role("button", name="Save").click()

    page.get_by_role("status").wait_for()
    assert page.get_by_role("status").inner_text() == "Saved: 1"
    assert page.url == browser_page.url("/prefs/?saved=1")
    assert subscriptions(user) == {("alerts", "chat"), ("digest", "mail")}
    assert not OptOut.objects.filter(recipient=user).exists()
    assert not page.get_by_label("News: Chat").is_checked()
    assert page.get_by_label("Alerts: Chat").is_checked()
    shot = browser_page.screenshot("saved")
    assert shot.stat().st_size > 1000
