"""Unsubscribe and read links: signed, purpose-bound, expiring tokens and the URLs that carry
them.

A token is Django's ``signing.dumps`` of what the link is about (the message and dispatch ids,
the message type, the messenger, the recipient's user id and a digest of the address), salted
with its purpose, so a read-pixel token cannot unsubscribe. It expires after
SITEMESSAGE_LINK_MAX_AGE, is checked against SECRET_KEY and SECRET_KEY_FALLBACKS, and carries
all the view needs, so a link keeps working after its dispatch row was cleaned up. It holds no
address: a link ends up in web server logs. django-sitemessage used one unsalted hash of the ids
and the secret key for both purposes, valid forever.

The URLs keep django-sitemessage's shape and names (``sitemessage_unsubscribe``,
``sitemessage_mark_read``: ``.../<message id>/<dispatch id>/<token>/``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from django.conf import settings
from django.core import signing
from django.urls import NoReverseMatch, reverse

from . import conf

logger = logging.getLogger(__name__)

Purpose = Literal["unsubscribe", "mark_read"]
URL_NAMES: dict[Purpose, str] = {
    "unsubscribe": "sitemessage_unsubscribe",
    "mark_read": "sitemessage_mark_read",
}


@dataclass(frozen=True)
class Link:
    """What a valid token says."""

    message_id: int
    dispatch_id: int
    message_type: str
    messenger: str
    recipient_id: int | None
    address_digest: str


def address_digest(address: str) -> str:
    """The digest under which an address's opt-outs are kept: SHA-256 of the address without
    surrounding blanks, case-folded (suppressing a case variant too is the safe side)."""
    return hashlib.sha256(address.strip().casefold().encode()).hexdigest()


def make_token(purpose: Purpose, dispatch: Any, message_type: str) -> str:
    """The token of a ``purpose`` link for a saved dispatch of a message of ``message_type``."""
    payload = [
        dispatch.message_id,
        dispatch.pk,
        message_type,
        dispatch.messenger,
        dispatch.recipient_id,
        address_digest(dispatch.address),
    ]
    return signing.dumps(payload, salt=_salt(purpose), compress=True)


def read_token(purpose: Purpose, token: str) -> Link | None:
    """What a token says, or None when it is not a valid, unexpired ``purpose`` token."""
    try:
        payload = signing.loads(
            token, salt=_salt(purpose), max_age=timedelta(seconds=conf.LINK_MAX_AGE.get())
        )
        message_id, dispatch_id, message_type, messenger, recipient_id, digest = payload
        return Link(
            int(message_id), int(dispatch_id), message_type, messenger, recipient_id, digest
        )
    except (signing.BadSignature, ValueError, TypeError):
        return None


def _salt(purpose: Purpose) -> str:
    return f"sitemessage.links.{purpose}"


def site_url() -> str:
    """Scheme and host that links start with: SITEMESSAGE_SITE_URL, else the project's
    SITE_URL, else the current site of the sites framework (https); '' when none is known."""
    url = conf.SITE_URL.get() or getattr(settings, "SITE_URL", None)
    if not url and "django.contrib.sites" in settings.INSTALLED_APPS:
        from django.contrib.sites.models import Site

        url = f"https://{Site.objects.get_current().domain}"
    return str(url or "").rstrip("/")


def available(purpose: Purpose) -> bool:
    """Whether messages can carry ``purpose`` links: a site URL is known and the views are
    attached."""
    if not site_url():
        return False
    try:
        reverse(URL_NAMES[purpose], args=[1, 1, "token"])
    except NoReverseMatch:
        return False
    return True


def link_url(purpose: Purpose, dispatch: Any, message_type: str) -> str:
    """The absolute URL of a ``purpose`` link for a saved dispatch; '' when the project has
    not attached the views (get_sitemessage_urls()) or no site URL is known: a message carries
    no link rather than a broken one."""
    base = site_url()
    if not base or dispatch is None or dispatch.pk is None:
        return ""
    token = make_token(purpose, dispatch, message_type)
    try:
        path = reverse(URL_NAMES[purpose], args=[dispatch.message_id, dispatch.pk, token])
    except NoReverseMatch:
        return ""
    return f"{base}{path}"
