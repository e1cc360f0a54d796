"""Every public name of django-sitemessage 1.4 (tests/upstream_names.txt) resolves at its import
path, except the few in DELIBERATE; then what each name we added does, against real
components: the test database, an aiosmtpd server, prosody, the fake Telegram, Facebook and VK
APIs, and fresh Python processes for what depends on how Django or the package is set up."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import smtplib
import subprocess
import sys
import textwrap
import threading
import tomllib
import typing
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ImproperlyConfigured
from django.template import Context, TemplateSyntaxError
from django.template.base import Parser
from django.test import override_settings
from django.utils import timezone

import sitemessage
import sitemessage.settings as sm_settings
from dispatcher import pipeline, toolbox, types, version
from dispatcher.messages import MessageBase, PlainTextMessage, register_message_types
from messengers import exceptions as errors
from messengers.base import MessengerBase, cool_down, warm_up
from messengers.http import HTTPMessenger, Proxy
from messengers.registry import register_messenger_objects
from sitemessage.messages import register_builtin_message_types
from sitemessage.messengers.base import Recipient, RequestsMessengerBase, TypeProxy
from sitemessage.messengers.facebook import FacebookMessenger, FacebookMessengerException
from sitemessage.messengers.smtp import SMTPMessenger
from sitemessage.messengers.telegram import TelegramMessenger, TelegramMessengerException
from sitemessage.messengers.vkontakte import VKontakteMessenger, VKontakteMessengerException
from sitemessage.messengers.xmpp import XMPPSleekMessenger
from sitemessage.models import USER_MODEL, Dispatch, DispatchError, Message, MessageTuple
from sitemessage.templatetags import sitemessage as sm_tags
from sitemessage.toolbox import TypeMessages, recipients, schedule_messages
from sitemessage.utils import (
    TypeMessage,
    TypeMessenger,
    TypeRecipient,
    TypeRecipients,
    TypeUser,
    get_site_url,
    import_app_sitemessage_module,
    import_project_sitemessage_modules,
    is_iterable,
)
from tests.support import ROOT, free_port
from tests.xmpp_server import DOMAIN, PASSWORD, SENDER, Prosody
from tests.xmpp_server import prosody as prosody

if typing.TYPE_CHECKING:
    from tests.fake_apis import FakeFacebook, FakeTelegram, FakeVK

NAMES_FILE = Path(__file__).with_name("upstream_names.txt")
Status = Dispatch.Status

#: Upstream's public names we do not provide: name -> why (one line each).
DELIBERATE = {
    # Django 4.1 removed default_app_config; it finds sitemessage/apps.py's config by itself.
    "sitemessage.default_app_config": "removed from Django 4.1+, which finds the app's config without it",
    # Upstream's cache of whether the database can SELECT ... FOR UPDATE SKIP LOCKED.
    "sitemessage.models.GET_DISPATCHES_ARGS": "internal cache of upstream's claim query; ours is one UPDATE on every database",
    # The context column is a JSONField (migration 0005); ContextField kept JSON in a TEXT column.
    "sitemessage.models.ContextField": "Message.context is a models.JSONField, not a text field of JSON",
    "sitemessage.models.ContextField.parse_value": "a method of ContextField, which the JSONField replaces",
    "sitemessage.models.ContextField.from_db_value": "a method of ContextField, which the JSONField replaces",
    "sitemessage.models.ContextField.to_python": "a method of ContextField, which the JSONField replaces",
    "sitemessage.models.ContextField.get_prep_value": "a method of ContextField, which the JSONField replaces",
    # Upstream's in-process batch driver; claim -> render -> send -> persist is pipeline.py's.
    "sitemessage.messengers.base.DispatchProcessingHandler": "upstream's in-process batch driver; delivery is dispatcher/pipeline.py's",
    "sitemessage.messengers.base.MessengerBase.process_messages": "upstream's in-process batch driver; send_scheduled_messages() runs pipeline.py's",
    # Upstream's cache of whether the unsubscribe and read views are attached.
    "sitemessage.messages.base.APP_URLS_ATTACHED": "internal cache; links.link_url() asks the URLconf each time",
}


def resolve(name: str) -> bool:
    """Imports the longest module prefix of ``name`` and looks the rest up as attributes; the
    last part may instead be a dataclass field or a model field (an instance attribute)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        break
    *path, last = parts[cut:]
    for attribute in path:
        if not hasattr(obj, attribute):
            return False
        obj = getattr(obj, attribute)
    if hasattr(obj, last):
        return True
    if dataclasses.is_dataclass(obj):
        return last in {field.name for field in dataclasses.fields(obj)}
    meta = getattr(obj, "_meta", None)
    return meta is not None and last in {field.name for field in meta.get_fields()}


def test_every_upstream_public_name_resolves_or_is_deliberately_left_out():
    names = NAMES_FILE.read_text().split()
    assert len(names) == len(set(names))
    assert set(DELIBERATE) <= set(names), set(DELIBERATE) - set(names)
    checked = [name for name in names if name not in DELIBERATE]
    missing = [name for name in checked if not resolve(name)]
    provided_anyway = [name for name in DELIBERATE if resolve(name)]
    print(f"{len(names)} upstream names: {len(checked)} checked, {len(DELIBERATE)} deliberate")
    assert missing == []
    assert provided_anyway == []  # a name we provide now must leave DELIBERATE
    assert len(checked) + len(DELIBERATE) == len(NAMES_FILE.read_text().splitlines())


def test_resolve_tells_a_missing_name():
    assert resolve("sitemessage.utils.Recipient.address")  # a dataclass field
    assert resolve("sitemessage.models.Dispatch.address")  # a model field
    assert not resolve("sitemessage.utils.no_such_function")
    assert not resolve("sitemessage.models.Dispatch.no_such_field")
    assert not resolve("sitemessage.models.NoSuchClass.method")


# --- sitemessage.VERSION -------------------------------------------------------------------


def run(code: str, *args: str, pythonpath: Path | None = None) -> str:
    """Runs ``code`` in a fresh Python (no Django settings module) in the checkout; returns
    the last line it printed."""
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


def test_version_is_the_installed_distributions(tmp_path):
    info = tmp_path / "sitemessage_celery-9.8.7rc1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sitemessage-celery\nVersion: 9.8.7rc1\n"
    )
    assert run("import sitemessage; print(sitemessage.VERSION)", pythonpath=tmp_path) == (
        "(9, 8, 7)"
    )


def test_version_in_a_checkout_is_pyprojects(tmp_path, monkeypatch):
    try:
        metadata.version(version.DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    else:
        pytest.skip("the distribution is installed: its version is used")
    text = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sitemessage.VERSION == tuple(int(p) for p in text.split(".")) and sitemessage.VERSION
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "someone-else"\nversion = "3.0"\n')
    monkeypatch.setattr(version, "PYPROJECT", other)
    assert version.version_text() == "0"  # another project's pyproject says nothing of ours
    monkeypatch.setattr(version, "PYPROJECT", tmp_path / "missing.toml")
    assert version.version_text() == "0"


@pytest.mark.parametrize(
    "text, expected",
    [("1.4.0", (1, 4, 0)), ("0.1", (0, 1)), ("2.0.0rc1", (2, 0, 0)), ("1.0+local.7", (1, 0))],
)
def test_version_tuple_keeps_the_release_numbers(text, expected):
    assert version.version_tuple(text) == expected


# --- sitemessage.settings ------------------------------------------------------------------


def test_settings_have_upstreams_defaults():
    assert {name: getattr(sm_settings, name) for name in sm_settings.__all__} == {
        "APP_MODULE_NAME": "sitemessages",
        "INIT_BUILTIN_MESSAGE_TYPES": True,
        "EMAIL_BACKEND_MESSAGES_PRIORITY": None,
        "SHORTCUT_EMAIL_MESSENGER_TYPE": "smtp",
        "SHORTCUT_EMAIL_MESSAGE_TYPE": None,
        "SITE_URL": None,
    }
    assert dir(sm_settings) == sorted(sm_settings.__all__)


def test_settings_are_read_when_used():
    with override_settings(
        SITEMESSAGE_SITE_URL="https://shop.example.com",
        SITEMESSAGE_EMAIL_BACKEND_MESSAGES_PRIORITY=7,
        SITEMESSAGE_SHORTCUT_EMAIL_MESSENGER_TYPE="mail",
    ):
        assert sm_settings.SITE_URL == "https://shop.example.com"
        assert sm_settings.EMAIL_BACKEND_MESSAGES_PRIORITY == 7
        assert sm_settings.SHORTCUT_EMAIL_MESSENGER_TYPE == "mail"
    assert sm_settings.SITE_URL is None


def test_settings_check_the_value_and_know_only_upstreams_names():
    with override_settings(SITEMESSAGE_INIT_BUILTIN_MESSAGE_TYPES="yes"):
        with pytest.raises(ImproperlyConfigured, match="SITEMESSAGE_INIT_BUILTIN_MESSAGE_TYPES"):
            sm_settings.INIT_BUILTIN_MESSAGE_TYPES
    with pytest.raises(AttributeError, match="BATCH_SIZE"):
        sm_settings.BATCH_SIZE  # ours, not upstream's: only in dispatcher/conf.py


# --- sitemessage.models --------------------------------------------------------------------


class Grouped(PlainTextMessage):
    """A plain text whose messages of one mark are merged (Message.create()'s path)."""

    alias = "grouped_plain"
    group_mark = "digest"


@pytest.fixture
def user(db):
    return get_user_model().objects.create(username="ann", email="ann@example.com")


def test_user_model_names_the_user_model():
    assert USER_MODEL == settings.AUTH_USER_MODEL
    assert apps.get_model(USER_MODEL) is get_user_model()


@pytest.mark.django_db
def test_message_create_returns_a_message_tuple(user):
    created = Message.create("plain", {"stext_": "hi"}, recipients("smtp", user))
    assert isinstance(created, MessageTuple)
    assert created.message == Message.objects.get()
    assert created.dispatches == list(Dispatch.objects.all())
    message, dispatches = created  # still a pair
    assert (message, dispatches) == (created.message, created.dispatches)
    waiting = Message.create("plain", {"stext_": "later"})
    assert isinstance(waiting, MessageTuple) and waiting.dispatches == []


@pytest.mark.django_db
def test_a_grouped_message_create_returns_a_message_tuple(user):
    first = Message.create("plain", {"n": 1}, recipients("smtp", user), group_mark="digest")
    merged = Message.create("plain", {"n": 2}, recipients("smtp", user), group_mark="digest")
    assert isinstance(merged, MessageTuple)
    assert merged.message.pk == first.message.pk and merged.message.context == {"n": 2}
    assert [d.pk for d in merged.dispatches] == [d.pk for d in first.dispatches]


@pytest.mark.django_db
def test_schedule_messages_returns_message_tuples(user, no_publish, registries):
    register_message_types(Grouped)
    plain, grouped = schedule_messages(
        [PlainTextMessage("hi"), Grouped("digest")], recipients("smtp", user)
    )
    for created in (plain, grouped):
        assert isinstance(created, MessageTuple)
        assert [d.message_id for d in created.dispatches] == [created.message.pk]
    assert grouped.message.group_mark == "digest"


@pytest.mark.django_db
def test_get_without_dispatches_returns_the_messages_waiting_for_subscribers(user):
    waiting = Message.create("plain", {"stext_": "for subscribers"}).message
    Message.create("plain", {"stext_": "addressed"}, recipients("smtp", user))
    assert list(Message.get_without_dispatches()) == [waiting]


def test_status_choices_are_upstreams():
    assert [value for value, _ in Dispatch.DISPATCH_STATUSES] == [1, 5, 2, 3, 4]
    assert [value for value, _ in Dispatch.READ_STATUSES] == [0, 1]
    assert list(Dispatch.DISPATCH_STATUSES) == Dispatch._meta.get_field("dispatch_status").choices
    assert list(Dispatch.READ_STATUSES) == Dispatch._meta.get_field("read_status").choices
    labels = dict(Dispatch.DISPATCH_STATUSES)
    assert labels[Dispatch.DISPATCH_STATUS_SENT] == "sent"


@pytest.mark.django_db
def test_get_unsent_returns_pending_and_erroneous_dispatches_and_claims_nothing(user):
    low = Message.create("plain", {}, recipients("smtp", ["a@x.test", "b@x.test", "c@x.test"]))
    urgent = Message.create("plain", {}, recipients("smtp", ["d@x.test", "e@x.test"]), None, 9)
    pending, error, sent = low.dispatches
    Dispatch.objects.filter(pk=error.pk).update(dispatch_status=Status.ERROR)
    Dispatch.objects.filter(pk=sent.pk).update(dispatch_status=Status.SENT)
    Dispatch.objects.filter(pk=urgent.dispatches[1].pk).update(dispatch_status=Status.PROCESSING)

    unsent = list(Dispatch.get_unsent())
    assert [d.pk for d in unsent] == [pending.pk, error.pk, urgent.dispatches[0].pk]
    assert [d.pk for d in Dispatch.get_unsent(priority=9)] == [urgent.dispatches[0].pk]
    assert Dispatch.objects.get(pk=pending.pk).dispatch_status == Status.PENDING  # not claimed
    with pytest.raises(errors.ScheduleError, match="priority"):
        Dispatch.get_unsent(priority=-1)


@pytest.mark.django_db
def test_group_by_messengers_has_upstreams_shape(user, registries):
    register_messenger_objects(Collecting())
    first = Message.create("plain", {}, recipients("smtp", ["a@x.test", "b@x.test"]))
    second = Message.create(
        "plain", {}, recipients("smtp", ["c@x.test"]) + recipients("collecting", ["z"])
    )
    grouped = Dispatch.group_by_messengers(Dispatch.objects.order_by("pk"))
    assert list(grouped) == ["smtp", "collecting"]
    assert list(grouped["smtp"]) == [first.message.pk, second.message.pk]
    entry = grouped["smtp"][first.message.pk]
    assert isinstance(entry, MessageTuple) and entry.message == first.message
    assert [d.address for d in entry.dispatches] == ["a@x.test", "b@x.test"]
    assert [d.address for d in grouped["collecting"][second.message.pk].dispatches] == ["z"]


# --- sitemessage.utils ---------------------------------------------------------------------


def test_type_aliases_are_upstreams():
    assert TypeUser is AbstractBaseUser and issubclass(get_user_model(), TypeUser)
    assert set(typing.get_args(TypeRecipient)) == {int, str, TypeUser}
    assert set(typing.get_args(TypeRecipients)) == {int, str, TypeUser, list[TypeRecipient]}
    assert typing.get_args(TypeMessage) == (str, type[MessageBase])
    assert typing.get_args(TypeMessenger) == (str, type[MessengerBase])
    assert typing.get_args(TypeMessages) == (str, MessageBase, list[str | MessageBase])
    assert TypeProxy == Proxy


@pytest.mark.django_db
def test_a_user_is_a_type_recipient(user):
    assert isinstance(user, TypeRecipient) and isinstance("a@x.test", TypeRecipient)
    assert not isinstance(object(), TypeRecipient)


def test_get_site_url_is_the_links_site_url():
    with override_settings(SITEMESSAGE_SITE_URL="https://example.com/", SITE_URL=None):
        assert get_site_url() == "https://example.com"
    with override_settings(SITEMESSAGE_SITE_URL=None, SITE_URL="https://fallback.example.com"):
        assert get_site_url() == "https://fallback.example.com"


@pytest.mark.django_db
def test_is_iterable_counts_containers_not_strings(user):
    assert all(map(is_iterable, ([1], (1,), {1}, {"a": 1}, iter([]), (x for x in "ab"))))
    assert not any(map(is_iterable, ("abc", 1, None, user)))


def test_import_app_sitemessage_module_by_package_label_or_config_path():
    module = import_app_sitemessage_module("tests.seedapp")
    assert isinstance(module, ModuleType) and module.__name__ == "tests.seedapp.sitemessages"
    assert import_app_sitemessage_module("seedapp") is module  # the app's label
    assert import_app_sitemessage_module("sitemessage") is None  # the app in dispatcher/: none
    assert import_app_sitemessage_module("dispatcher.apps.DispatcherConfig") is None
    with override_settings(SITEMESSAGE_APP_MODULE_NAME="admin"):
        admin = import_app_sitemessage_module("auth")
        assert admin is not None and admin.__name__ == "django.contrib.auth.admin"


def test_import_app_sitemessage_module_lets_errors_through(tmp_path, monkeypatch):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sitemessages.py").write_text("raise RuntimeError('broken registration')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="broken registration"):
        import_app_sitemessage_module("brokenpkg")
    with pytest.raises(ModuleNotFoundError, match="nosuchpkg"):
        import_app_sitemessage_module("nosuchpkg")


def test_import_project_sitemessage_modules_imports_each_apps_module_in_order():
    modules = import_project_sitemessage_modules()
    names = [module.__name__ for module in modules]
    expected = [
        f"{config.name}.sitemessages"
        for config in apps.get_app_configs()
        if (Path(config.path) / "sitemessages.py").exists()
    ]
    assert names == expected and "tests.seedapp.sitemessages" in names
    assert all(sys.modules[name] is module for name, module in zip(names, modules, strict=True))


# --- sitemessage.messages ------------------------------------------------------------------


def test_register_builtin_message_types(registries):
    types._message_types.clear()
    register_builtin_message_types()
    assert set(types.get_registered_message_types()) == {"plain", "email_plain", "email_html"}


# --- sitemessage.templatetags --------------------------------------------------------------


TAG_SCRIPT = """
    import json, sys
    import django
    from django.conf import settings
    settings.configure(
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", sys.argv[1]],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}],
    )
    django.setup()
    from django.core import checks
    from django.template import Context, Template, engines
    from django.template.backends.django import get_template_tag_modules
    import dispatcher.templatetags.sitemessage as ours
    import sitemessage.templatetags.sitemessage as upstreams
    library = engines["django"].engine.template_libraries["sitemessage"]
    rendered = Template("{% load sitemessage %}[{% sitemessage_prefs_table from x %}]").render(
        Context({"x": "not the prefs tuple"})
    )
    print(json.dumps({
        "modules": [path for name, path in get_template_tag_modules() if name == "sitemessage"],
        "same": library is ours.register is upstreams.register,
        "duplicates": [str(m) for m in checks.run_checks(tags=["templates"])],
        "rendered": rendered,
    }))
"""


@pytest.mark.parametrize("app", ["sitemessage", "dispatcher"])
def test_load_sitemessage_finds_one_library_whichever_name_is_installed(app):
    assert json.loads(run(TAG_SCRIPT, app)) == {
        "modules": ["dispatcher.templatetags.sitemessage"],
        "same": True,
        "duplicates": [],
        "rendered": "[]",
    }


def test_upstreams_template_tag_names_are_dispatchers():
    from dispatcher.templatetags import sitemessage as ours

    assert sm_tags.register is ours.register
    assert sm_tags.sitemessage_prefs_tableNode is ours.PrefsTableNode
    assert sm_tags.sitemessage_prefs_table is ours.sitemessage_prefs_table


def test_detect_clause_takes_the_clause_out_of_the_tokens():
    parser = Parser([])
    tokens = ["sitemessage_prefs_table", "from", "prefs", "template", "'x.html'"]
    value = sm_tags.detect_clause(parser, "template", tokens)
    assert value is not None and value.resolve(Context()) == "x.html"
    assert tokens == ["sitemessage_prefs_table", "from", "prefs"]
    assert sm_tags.detect_clause(parser, "template", tokens) is None
    with pytest.raises(TemplateSyntaxError, match="notation"):
        sm_tags.detect_clause(parser, "from", ["sitemessage_prefs_table", "from"])


def test_upstreams_node_class_renders_the_table():
    prefs = (["E-mail"], {"Plain": [("plain|smtp", True, True)]})
    node = sm_tags.sitemessage_prefs_tableNode(Parser([]).compile_filter("prefs"), None)
    html = node.render(Context({"prefs": prefs}))
    assert 'value="plain|smtp"' in html and "checked" in html


# --- sitemessage.messengers.base: MessengerBase ---------------------------------------------


class Collecting(MessengerBase):
    """Counts its lifecycle calls; ``send()`` runs ``self.on_send`` on each dispatch."""

    alias = "collecting"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.on_send: Callable[[Any], None] = self.mark_sent

    def before_send(self) -> None:
        self.calls.append("before")

    def after_send(self) -> None:
        self.calls.append("after")

    def send(self, message_cls: Any, message_model: Any, dispatch_models: list[Any]) -> None:
        for dispatch in dispatch_models:
            self.on_send(dispatch)

    def _test_message(self, to: str, text: str) -> str:
        self.calls.append(f"test {to}")
        return "id-1"


def test_before_after_send_handling_warms_and_cools_a_cold_messenger():
    messenger = Collecting()
    with messenger.before_after_send_handling():
        assert messenger.calls == ["before"]
    assert messenger.calls == ["before", "after"]
    with pytest.raises(RuntimeError), messenger.before_after_send_handling():
        raise RuntimeError("in the block")
    assert messenger.calls == ["before", "after", "before", "after"]  # cooled all the same


def test_before_after_send_handling_leaves_a_warm_messenger_warm():
    messenger = Collecting()
    warm_up(messenger)  # as a worker process does when it starts
    with messenger.before_after_send_handling():
        pass
    assert messenger.send_test_message("x", "hello") == "id-1"
    assert messenger.calls == ["before", "test x"]  # the worker's connection stays open
    cool_down(messenger)
    assert messenger.calls == ["before", "test x", "after"]


def test_a_failed_warm_up_propagates_and_leaves_the_messenger_cold():
    messenger = Collecting()

    def refuse() -> None:
        raise errors.MessengerWarmupException("server down")

    messenger.before_send = refuse  # type: ignore[method-assign]
    with pytest.raises(errors.MessengerWarmupException), messenger.before_after_send_handling():
        pytest.fail("the block must not run")
    assert messenger.calls == [] and not messenger.__dict__.get("_sm_warm")


@pytest.mark.django_db
def test_structure_recipients_data_builds_recipients_without_checking(user):
    assert SMTPMessenger.structure_recipients_data([user, "not-an-email"]) == [
        Recipient("smtp", user, "ann@example.com"),
        Recipient("smtp", None, "not-an-email"),
    ]
    assert SMTPMessenger().structure_recipients_data("a@x.test") == [
        Recipient("smtp", None, "a@x.test")
    ]


class Team(Collecting):
    """Expands a team name into its members' addresses, as an upstream messenger could."""

    alias = "team"
    teams = {"devs": ["ann", "bob"]}

    @classmethod
    def structure_recipients_data(cls, recipients: Any) -> list[Recipient]:
        names = recipients if is_iterable(recipients) else [recipients]
        expanded = [member for name in names for member in cls.teams.get(name, [name])]
        return super().structure_recipients_data(expanded)


@pytest.mark.django_db
def test_recipients_uses_the_messengers_structure_recipients_data(registries):
    renamed = Team()
    renamed.alias = "team-b"  # as SITEMESSAGE_MESSENGERS registers a class under another alias
    register_messenger_objects(Team(), renamed)
    assert recipients("team", "devs") == [
        Recipient("team", None, "ann"),
        Recipient("team", None, "bob"),
    ]
    assert [r.messenger for r in recipients("team-b", ["devs", "eve"])] == ["team-b"] * 3
    with pytest.raises(errors.InvalidAddressError, match="empty address"):
        recipients("team", ["devs", " "])  # what it returns is checked


@pytest.mark.django_db
def test_recipients_refuses_what_an_override_returns_instead_of_recipients(registries):
    class Broken(Collecting):
        alias = "broken"

        @classmethod
        def structure_recipients_data(cls, recipients: Any) -> list[Any]:
            return [("broken", None, "a")]

    register_messenger_objects(Broken())
    with pytest.raises(errors.ScheduleError, match="must return Recipient objects, got tuple"):
        recipients("broken", "a")


@pytest.mark.django_db
def test_mark_pending_gives_a_dispatch_back_without_spending_an_attempt(registries, no_publish):
    messenger = Collecting()
    messenger.on_send = messenger.mark_pending
    register_messenger_objects(messenger)
    [(_, [dispatch])] = toolbox.schedule(PlainTextMessage("hi"), recipients("collecting", "z"))

    pipeline.deliver("collecting", [dispatch.pk], owner="test")
    row = Dispatch.objects.get(pk=dispatch.pk)
    assert (row.dispatch_status, row.retry_count, row.lease_owner) == (Status.ERROR, 0, "")
    assert row.next_attempt_at is not None
    assert row.next_attempt_at <= timezone.now() + timedelta(seconds=1)  # due again at once
    assert not DispatchError.objects.exists()

    messenger.on_send = messenger.mark_sent
    pipeline.deliver("collecting", [dispatch.pk], owner="test")  # claimable at once
    row.refresh_from_db()
    assert (row.dispatch_status, row.retry_count) == (Status.SENT, 1)


# --- RequestsMessengerBase -----------------------------------------------------------------


class BotPoster(RequestsMessengerBase):
    """A messenger of one's own on the helpers: posts the text as form data to sendMessage."""

    alias = "botposter"

    def __init__(self, api: FakeTelegram) -> None:
        self.url = f"{api.url}/bot{api.token}"

    def deliver(self, address: str, text: str, dispatch_id: int | None) -> str:
        answer = self.post(f"{self.url}/sendMessage", {"chat_id": address, "text": text})
        if not answer.get("ok"):
            raise errors.PermanentDeliveryError(str(answer.get("description")), alias=self.alias)
        return str(answer["result"]["message_id"])


def test_requests_messenger_base_is_the_http_messenger():
    assert RequestsMessengerBase is HTTPMessenger
    assert issubclass(TelegramMessenger, RequestsMessengerBase)
    assert RequestsMessengerBase.timeout == 10


def test_get_and_post_go_through_the_messengers_session(telegram_api):
    messenger = BotPoster(telegram_api)
    warm_up(messenger)
    assert messenger.send_test_message("421337", "via post()") == "1"
    assert telegram_api.messages[0]["text"] == "via post()"
    assert messenger.get(f"{messenger.url}/getMe")["result"]["username"] == "sitemessage_test_bot"
    text = messenger.get(f"{messenger.url}/getMe", json=False)
    assert isinstance(text, str) and json.loads(text)["ok"] is True
    assert messenger.get(f"{telegram_api.url}/botwrong/getMe")["error_code"] == 401  # as answered
    assert telegram_api.connections == 1  # one kept-alive session
    cool_down(messenger)


def test_get_and_post_errors_name_the_host_not_the_url():
    messenger = BotPoster.__new__(BotPoster)
    messenger.timeout = 2
    with pytest.raises(errors.TemporaryDeliveryError, match=r"cannot reach 127\.0\.0\.1") as caught:
        messenger.get(f"http://127.0.0.1:{free_port()}/bot123:SECRET/getMe")
    assert "SECRET" not in str(caught.value)


@pytest.fixture
def html_server() -> Iterator[str]:
    """Answers ``GET /<status>`` with that status and an HTML page (a proxy's error page)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>proxy error</html>"
            self.send_response(int(self.path.strip("/")))
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_without_json_is_temporary_only_for_server_errors(html_server):
    messenger = BotPoster.__new__(BotPoster)
    with pytest.raises(errors.TemporaryDeliveryError, match="HTTP 502 without JSON"):
        messenger.get(f"{html_server}/502")
    with pytest.raises(errors.PermanentDeliveryError, match="HTTP 404 without JSON"):
        messenger.get(f"{html_server}/404")
    assert messenger.get(f"{html_server}/200", json=False) == "<html>proxy error</html>"
    messenger.after_send()


# --- TelegramMessenger.get_updates / get_chat_ids -----------------------------------------


def test_get_chat_ids_are_the_chats_that_started_the_bot(telegram_api):
    telegram_api.receive(421337, "/start")
    telegram_api.receive(421337, "hello")
    telegram_api.receive(555001, "/start ref-campaign-7")  # a deep link's payload
    telegram_api.receive(-1001234567890, "/start@sitemessage_test_bot", user_id=777)
    telegram_api.receive(421337, "/start")  # again: listed once
    telegram_api.receive(555002, "/started")  # not the command
    telegram_api.receive(555003, "/start", kind="edited_message")  # not a new message
    messenger = TelegramMessenger(**telegram_api.options())

    assert messenger.get_chat_ids() == [421337, 555001, -1001234567890]
    updates = messenger.get_updates()
    assert len(updates) == 7 and [u["update_id"] for u in updates] == sorted(
        u["update_id"] for u in updates
    )
    assert messenger._session is None  # get_updates() closed what it opened


def test_get_updates_with_an_offset_confirms_the_earlier_updates(telegram_api):
    first = telegram_api.receive(421337, "/start")
    second = telegram_api.receive(555001, "/start")
    messenger = TelegramMessenger(**telegram_api.options())
    assert [u["update_id"] for u in messenger.get_updates()] == [first, second]
    assert [u["update_id"] for u in messenger.get_updates(offset=second)] == [second]
    assert [u["update_id"] for u in messenger.get_updates()] == [second]  # first is forgotten
    assert messenger.get_updates(offset=second + 1) == []


def test_get_updates_keeps_a_warm_session_open(telegram_api):
    messenger = TelegramMessenger(**telegram_api.options())
    warm_up(messenger)
    messenger.get_updates()
    messenger.get_updates()
    assert messenger._session is not None and telegram_api.connections == 1
    cool_down(messenger)


def test_get_updates_errors_are_telegram_messenger_exceptions(telegram_api):
    telegram_api.webhook = True
    messenger = TelegramMessenger(**telegram_api.options())
    with pytest.raises(TelegramMessengerException, match="409 Conflict") as caught:
        messenger.get_updates()
    assert isinstance(caught.value, errors.PermanentDeliveryError)
    bad_token = TelegramMessenger(**{**telegram_api.options(), "auth_token": "1:WRONGTOKEN"})
    with pytest.raises(errors.TelegramPermanentError, match="401 Unauthorized") as caught:
        bad_token.get_chat_ids()
    assert "WRONGTOKEN" not in str(caught.value)
    unreachable = TelegramMessenger(
        "1:SECRETTOKEN", base_url=f"http://127.0.0.1:{free_port()}", timeout=2
    )
    with pytest.raises(errors.TelegramTemporaryError, match="cannot reach") as caught:
        unreachable.get_updates()
    assert "SECRETTOKEN" not in str(caught.value)


# --- the channels' exception classes ------------------------------------------------------


@pytest.mark.parametrize(
    "root, temporary, permanent",
    [
        (TelegramMessengerException, errors.TelegramTemporaryError, errors.TelegramPermanentError),
        (FacebookMessengerException, errors.FacebookTemporaryError, errors.FacebookPermanentError),
        (
            VKontakteMessengerException,
            errors.VKontakteTemporaryError,
            errors.VKontaktePermanentError,
        ),
    ],
)
def test_channel_exceptions_sit_in_upstreams_and_our_hierarchy(root, temporary, permanent):
    assert issubclass(root, errors.DeliveryError) and issubclass(root, errors.MessengerException)
    assert issubclass(temporary, root) and issubclass(temporary, errors.TemporaryDeliveryError)
    assert issubclass(permanent, root) and issubclass(permanent, errors.PermanentDeliveryError)
    assert temporary("x").temporary and not permanent("x").temporary
    assert (
        str(permanent("refused", alias="a", dispatch_id=3)) == "refused (messenger=a, dispatch=3)"
    )


def test_telegram_delivery_errors_are_telegram_messenger_exceptions(telegram_api):
    telegram_api.fail_permanently("421337")
    telegram_api.fail_temporarily("421338", 502)
    messenger = TelegramMessenger(**telegram_api.options())
    with pytest.raises(errors.TelegramPermanentError, match="chat not found"):
        messenger.deliver("421337", "hi", 1)
    with pytest.raises(errors.TelegramTemporaryError, match="server error"):
        messenger.deliver("421338", "hi", 2)
    messenger.after_send()


def test_facebook_delivery_errors_are_facebook_messenger_exceptions(facebook_api: FakeFacebook):
    page = next(iter(facebook_api.pages))
    facebook_api.fail_permanently(page)
    messenger = FacebookMessenger(**facebook_api.options())
    with pytest.raises(FacebookMessengerException) as caught:
        messenger.deliver(page, "hi", 1)
    assert isinstance(caught.value, errors.FacebookPermanentError)
    messenger.after_send()


def test_vkontakte_delivery_errors_are_vkontakte_messenger_exceptions(vk_api: FakeVK):
    vk_api.fail_permanently("-212000001")
    vk_api.fail_temporarily("-212000002")
    messenger = VKontakteMessenger(**vk_api.options())
    with pytest.raises(errors.VKontaktePermanentError):
        messenger.deliver("-212000001", "hi", 1)
    with pytest.raises(errors.VKontakteTemporaryError, match="rate limit"):
        messenger.deliver("-212000002", "hi", 2)
    messenger.after_send()


# --- SMTPMessenger.smtp, XMPPSleekMessenger.xmpp ------------------------------------------


def test_smtp_is_the_open_connection(smtp_server):
    _, port = smtp_server
    messenger = SMTPMessenger("shop@example.com", host="127.0.0.1", port=port)
    assert messenger.smtp is None
    messenger.before_send()
    assert isinstance(messenger.smtp, smtplib.SMTP) and messenger.smtp.noop()[0] == 250
    messenger.after_send()
    assert messenger.smtp is None
    with pytest.raises(AttributeError):
        messenger.smtp = smtplib.SMTP()  # type: ignore[misc]


def test_xmpp_is_the_logged_in_client(prosody: Prosody):
    messenger = XMPPSleekMessenger(
        SENDER, PASSWORD, host="127.0.0.1", port=prosody.port, use_tls=False
    )
    assert messenger.xmpp is None
    messenger.before_send()
    try:
        client = messenger.xmpp
        assert client is not None and client.boundjid.bare == SENDER
        assert client.boundjid.domain == DOMAIN and client.is_connected()
        # As its docstring says: coroutines go to the client's loop, the messenger's thread.
        on_loop = asyncio.run_coroutine_threadsafe(_running_loop(), client.loop).result(5)
        assert on_loop is client.loop  # a loop that runs: else .result(5) times out
    finally:
        messenger.after_send()
    assert messenger.xmpp is None


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()
