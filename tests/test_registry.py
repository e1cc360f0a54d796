"""The messenger registry and message types: registration, lookup, configuration from settings."""

import pytest

from dispatcher.messages import EmailHtmlMessage, PlainTextMessage, register_message_types
from dispatcher.models import Dispatch, Message
from messengers.exceptions import (
    MessengerConfigurationError,
    UnknownMessageTypeError,
    UnknownMessengerError,
)
from messengers.registry import messenger_from_settings
from sitemessage.messengers.smtp import SMTPMessenger
from sitemessage.utils import (
    MessengerBase,
    get_registered_message_type,
    get_registered_message_types,
    get_registered_messenger_object,
    get_registered_messenger_objects,
    register_messenger_objects,
)


def test_register_and_look_up_by_alias_class_or_instance(registries):
    class Pager(MessengerBase):
        def send(self, message_cls, message_model, dispatch_models):
            pass

    pager = Pager()
    register_messenger_objects(pager)
    assert get_registered_messenger_objects()["Pager"] is pager  # alias defaults to the class name
    assert get_registered_messenger_object("Pager") is pager
    assert get_registered_messenger_object(Pager) is pager


def test_unknown_alias_names_the_registered_ones():
    with pytest.raises(UnknownMessengerError) as info:
        get_registered_messenger_object("nope")
    for alias in ("smtp", "recorder", "mymessenger"):
        assert repr(alias) in str(info.value)


def test_only_messenger_objects_can_be_registered():
    with pytest.raises(TypeError, match="MessengerBase instances"):
        register_messenger_objects(SMTPMessenger)  # type: ignore[arg-type]  # the class


def test_settings_build_builtin_messengers_and_reject_unknown_options():
    smtp = messenger_from_settings("smtp", {"options": {"host": "mail.example.com", "port": 2525}})
    assert isinstance(smtp, SMTPMessenger) and smtp._opt("host") == "mail.example.com"
    with pytest.raises(
        MessengerConfigurationError, match=r"messenger 'smtp' .*'hots'.*did you mean 'host'"
    ):
        messenger_from_settings("smtp", {"options": {"hots": "x"}})
    with pytest.raises(MessengerConfigurationError, match=r"'custom'.*no 'class'"):
        messenger_from_settings("custom", {})
    with pytest.raises(
        MessengerConfigurationError, match=r"SITEMESSAGE_MESSENGERS\['smtp'\]: unknown key"
    ):
        messenger_from_settings("smtp", {"option": {}})


def test_a_settings_alias_overrides_the_class_alias():
    messenger = messenger_from_settings("bulkmail", {"class": "messengers.smtp.SMTPMessenger"})
    assert str(messenger) == "bulkmail"


def test_smtp_options_left_none_follow_django_settings_lazily(settings):
    messenger = SMTPMessenger(use_tls=False)
    settings.EMAIL_HOST, settings.EMAIL_USE_TLS = "late.example.com", True
    assert messenger._opt("host") == "late.example.com"
    assert messenger._opt("use_tls") is False  # an explicit False wins over a True setting


def test_message_types_register_under_their_alias(registries):
    class Digest(PlainTextMessage):
        alias = "digest"

    with pytest.raises(UnknownMessageTypeError):
        get_registered_message_type("digest")
    register_message_types(Digest)
    assert get_registered_message_type("digest") is Digest
    assert get_registered_message_types()["digest"] is Digest
    with pytest.raises(TypeError):
        register_message_types(Digest("x"))  # type: ignore[arg-type]


@pytest.mark.django_db
def test_a_text_is_sent_as_it_is_and_a_dict_renders_the_messengers_template(django_user_model):
    user = django_user_model.objects.create(username="ann")
    html = Message(cls="email_html", context=EmailHtmlMessage("S", "<b>bold</b> & co").context)
    assert EmailHtmlMessage.compile(html, "smtp", Dispatch(message=html, address="a@x.org")) == (
        "<b>bold</b> & co"  # HTML given as HTML, as django-sitemessage sends it
    )
    plain = Message(cls="plain", context=PlainTextMessage("<b> & 'quotes'").context)
    assert PlainTextMessage.compile(plain, "smtp") == "<b> & 'quotes'"

    templated = EmailHtmlMessage("Subj <1>", {"contents": "<p>hi</p>", "footer": "F"})
    message = Message(cls="email_html", context=templated.context)
    body = EmailHtmlMessage.compile(
        message, "smtp", Dispatch(message=message, address="a@x.org", recipient=user)
    )
    assert "<title>Subj &lt;1&gt;</title>" in body  # the subject is escaped
    assert "<p>hi</p>" in body  # contents are HTML (upstream's _base.html)
    assert EmailHtmlMessage.get_template(message, "smtp") == (
        "sitemessage/messages/email_html__smtp.html"
    )


@pytest.mark.parametrize("alias", ["sms,eu", "sms eu", "-sms", "sms/eu", "x" * 101, "émail"])
def test_an_alias_a_queue_cannot_carry_is_refused_at_registration(alias, registries):
    class Pager(MessengerBase):
        def send(self, message_cls, message_model, dispatch_models):
            pass

    messenger = Pager()
    messenger.alias = alias
    with pytest.raises(MessengerConfigurationError, match=r"letters A-Z and a-z, digits, '_'"):
        register_messenger_objects(messenger)
    assert alias not in get_registered_messenger_objects()
    for good in ("sms-eu", "sms_eu", "sms.eu", "SMS2"):
        messenger.alias = good
        register_messenger_objects(messenger)
        assert get_registered_messenger_object(good) is messenger
