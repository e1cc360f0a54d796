"""Every ``SITEMESSAGE_*`` setting, once: its default, its type and what it means.

Values are read from Django's settings each time they are used, so ``override_settings`` works.
``validate()`` runs when the app is ready (``manage.py``, workers, beat): a bad value stops the
process with an ``ImproperlyConfigured`` that names the setting and the value. ``get()``
checks the value too, so a setting changed at run time to something invalid fails where it is
used, with the same message, rather than as an unrelated error further down.

Each setting can also come from the environment variable of the same name (see
``from_environment``), which is how ``config.settings`` and the tests configure them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from messengers.base import ca_file_problem
from messengers.exceptions import did_you_mean

T = TypeVar("T")
PREFIX = "SITEMESSAGE_"
#: Schemes the rate limiter's Redis URL may use.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting; ``kind`` is int, float (an int is accepted), str, bool or dict."""

    name: str
    default: T
    kind: type
    meaning: str
    #: Smallest allowed number (inclusive) for int and float settings.
    minimum: float | None = None
    #: True when None is allowed (and means "not set").
    optional: bool = False
    #: Prefixes a str value must start with.
    prefixes: tuple[str, ...] = ()
    #: Further check of a value of the right kind: returns what is wrong with it, or None.
    validator: Callable[[Any], str | None] | None = None

    @property
    def key(self) -> str:
        return PREFIX + self.name

    def get(self) -> T:
        value = getattr(settings, self.key, self.default)
        self.check(value)
        return value  # type: ignore[no-any-return]

    def check(self, value: Any) -> None:
        """Raises ImproperlyConfigured naming the setting and the value unless it is valid."""
        problem = self._problem(value)
        if problem:
            raise ImproperlyConfigured(f"{self.key} {problem}, got {value!r}")

    def _problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be True or False"
        kinds: tuple[type, ...] = (int, float) if self.kind is float else (self.kind,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            what = {int: "an integer", float: "a number", str: "a string", dict: "a dict"}
            return f"must be {what[self.kind]}{' or None' if self.optional else ''}"
        if self.kind in (int, float):
            number = cast(float, value)
            if not math.isfinite(number):
                return "must be a finite number"
            if self.minimum is not None and number < self.minimum:
                return f"must be at least {self.minimum:g}"
        if self.kind is str and not value:
            return "must not be empty"
        if self.prefixes and not str(value).startswith(self.prefixes):
            return f"must start with {' or '.join(self.prefixes)}"
        if self.validator is not None:
            return self.validator(value)
        return None

    def parse(self, raw: str) -> Any:
        """The value of this setting given as the text of an environment variable. Text that
        does not parse is kept as it is, for validate() to reject by name: the settings module
        must not raise ImproperlyConfigured, which manage.py swallows."""
        if self.optional and raw == "":
            return None
        try:
            if self.kind is dict:
                return json.loads(raw)
            if self.kind is bool:
                return {"1": True, "true": True, "0": False, "false": False}.get(raw.lower(), raw)
            return self.kind(raw) if self.kind in (int, float) else raw
        except ValueError:
            return raw


MESSENGERS = Setting[dict[str, Any]](
    "MESSENGERS",
    {},
    dict,
    "the messengers of this deployment, alias -> {class, options, rate_limit}",
)
BATCH_SIZE = Setting[int]("BATCH_SIZE", 100, int, "dispatch ids per delivery task", minimum=1)
LEASE_SECONDS = Setting[float](
    "LEASE_SECONDS",
    30,
    float,
    "how long a claim holds without renewal (a running batch renews it every third of this)",
    minimum=0.001,
)
RETRY_BACKOFF = Setting[float](
    "RETRY_BACKOFF", 30, float, "seconds before the first retry; doubles per attempt", minimum=0
)
RETRY_BACKOFF_MAX = Setting[float](
    "RETRY_BACKOFF_MAX", 3600, float, "longest wait between two attempts", minimum=0
)
REPUBLISH_AFTER = Setting[float](
    "REPUBLISH_AFTER",
    300,
    float,
    "seconds a published dispatch may wait in its queue before the sweep publishes it again",
    minimum=0.001,
)
DOORBELL_SECONDS = Setting[float](
    "DOORBELL_SECONDS",
    10,
    float,
    "with a Redis broker: while a delivery task of a queue is waiting, a call that fits in one "
    "batch publishes none (that task's worker claims its rows); the pending mark expires after "
    "this many seconds; 0: a task per call",
    minimum=0,
)
#: PostgreSQL's synchronous_commit values.
SYNCHRONOUS_COMMIT_VALUES = ("on", "off", "local", "remote_write", "remote_apply")
WORKER_SYNCHRONOUS_COMMIT = Setting[str | None](
    "WORKER_SYNCHRONOUS_COMMIT",
    "off",
    str,
    "PostgreSQL's synchronous_commit for the connections of worker processes: 'off' does not "
    "wait for the disk flush of each SENT mark (a PostgreSQL crash may then re-send what was "
    "marked sent in its last half second; nothing is lost); None: the database's own setting",
    optional=True,
    validator=lambda value: (
        None
        if value in SYNCHRONOUS_COMMIT_VALUES
        else f"must be one of {SYNCHRONOUS_COMMIT_VALUES}"
    ),
)
OUTCOME_CHUNK = Setting[int](
    "OUTCOME_CHUNK",
    20,
    int,
    "failed outcomes written per database round trip (a sent one is written at once)",
    minimum=1,
)
DB_RETRY_SECONDS = Setting[float](
    "DB_RETRY_SECONDS",
    60,
    float,
    "how long a worker retries a database that is down or locked",
    minimum=0,
)
SWEEP_INTERVAL = Setting[float](
    "SWEEP_INTERVAL", 10, float, "seconds between two sweeps (beat)", minimum=0.1
)
SWEEP_LIMIT = Setting[int](
    "SWEEP_LIMIT", 10000, int, "most dispatches one sweep publishes", minimum=1
)
MAX_MESSAGE_SIZE = Setting[int](
    "MAX_MESSAGE_SIZE",
    5 * 1024 * 1024,
    int,
    "largest message context, in bytes of JSON, that scheduling accepts",
    minimum=1,
)
RATE_LIMIT_REDIS_URL = Setting[str | None](
    "RATE_LIMIT_REDIS_URL",
    None,
    str,
    "Redis of the shared rate limits; None: the broker when it is Redis, else local Redis",
    optional=True,
    prefixes=REDIS_SCHEMES,
)
RATE_LIMIT_MAX_WAIT = Setting[float](
    "RATE_LIMIT_MAX_WAIT",
    60,
    float,
    "seconds a batch waits for rate-limit slots before it gives the rest back",
    minimum=0,
)
SHORTCUT_EMAIL_MESSENGER_TYPE = Setting[str](
    "SHORTCUT_EMAIL_MESSENGER_TYPE", "smtp", str, "messenger alias of schedule_email()"
)
SHORTCUT_EMAIL_MESSAGE_TYPE = Setting[str | None](
    "SHORTCUT_EMAIL_MESSAGE_TYPE",
    None,
    str,
    "message type alias of schedule_email(); None: text or HTML by the message",
    optional=True,
)
CA_FILE = Setting[str | None](
    "CA_FILE",
    None,
    str,
    "PEM file of CA certificates every messenger trusts besides its usual ones",
    optional=True,
    validator=ca_file_problem,
)
SITE_URL = Setting[str | None](
    "SITE_URL",
    None,
    str,
    "scheme and host of links in messages (https://example.com); None: SITE_URL, then the "
    "sites framework, else messages carry no links",
    optional=True,
    prefixes=("https://", "http://"),
)
LINK_MAX_AGE = Setting[float](
    "LINK_MAX_AGE",
    180 * 24 * 3600,
    float,
    "seconds an unsubscribe or read link stays valid",
    minimum=1,
)
EMAIL_BACKEND_MESSAGES_PRIORITY = Setting[int | None](
    "EMAIL_BACKEND_MESSAGES_PRIORITY",
    None,
    int,
    "priority of the e-mail sitemessage.backends.EmailBackend schedules; None: the type's (0)",
    optional=True,
    minimum=0,
    validator=lambda value: None if value <= 32767 else "must be at most 32767",  # a Message row
)
APP_MODULE_NAME = Setting[str](
    "APP_MODULE_NAME", "sitemessages", str, "module of each app that registers messengers"
)
INIT_BUILTIN_MESSAGE_TYPES = Setting[bool](
    "INIT_BUILTIN_MESSAGE_TYPES", True, bool, "register the builtin message types at startup"
)
URGENT_PRIORITY = Setting[int | None](
    "URGENT_PRIORITY",
    None,
    int,
    "messages of at least this priority go to their messenger's urgent lane "
    "(messenger.<alias>.urgent), ahead of any backlog; None: one lane for all",
    optional=True,
    minimum=1,
    validator=lambda value: None if value <= 32767 else "must be at most 32767",  # a Message row
)
CLEANUP_AFTER_DAYS = Setting[int | None](
    "CLEANUP_AFTER_DAYS",
    None,
    int,
    "beat deletes sent dispatches (and messages left without any) this many days after they "
    "were sent, hourly; None: never (sitemessage_cleanup by hand)",
    optional=True,
    minimum=0,
)
FLOWER_URL = Setting[str | None](
    "FLOWER_URL",
    None,
    str,
    "Flower's address (https://flower.example.com); the admin links each dispatch's task id to "
    "its page there; None: no links",
    optional=True,
    prefixes=("https://", "http://"),
)
METRICS_DIR = Setting[str | None](
    "METRICS_DIR",
    None,
    str,
    "directory where this host's worker processes keep their counters for /metrics (one "
    "subdirectory per worker, emptied when it starts); None: VAR_DIR/metrics of the Django "
    "settings (this service: $SITEMESSAGE_VAR_DIR/metrics), no worker counters without VAR_DIR",
    optional=True,
)
METRICS_TOKEN = Setting[str | None](
    "METRICS_TOKEN",
    None,
    str,
    "bearer token that lets a scraper read /metrics (Authorization: Bearer <token>); None: "
    "staff sessions only",
    optional=True,
    validator=lambda value: None if len(value) >= 16 else "must be at least 16 characters",
)

#: Every setting, by its name without the prefix.
SETTINGS: dict[str, Setting[Any]] = {
    setting.name: setting
    for setting in (
        MESSENGERS,
        BATCH_SIZE,
        LEASE_SECONDS,
        RETRY_BACKOFF,
        RETRY_BACKOFF_MAX,
        REPUBLISH_AFTER,
        DOORBELL_SECONDS,
        WORKER_SYNCHRONOUS_COMMIT,
        OUTCOME_CHUNK,
        DB_RETRY_SECONDS,
        SWEEP_INTERVAL,
        SWEEP_LIMIT,
        MAX_MESSAGE_SIZE,
        RATE_LIMIT_REDIS_URL,
        RATE_LIMIT_MAX_WAIT,
        SHORTCUT_EMAIL_MESSENGER_TYPE,
        SHORTCUT_EMAIL_MESSAGE_TYPE,
        CA_FILE,
        SITE_URL,
        LINK_MAX_AGE,
        EMAIL_BACKEND_MESSAGES_PRIORITY,
        APP_MODULE_NAME,
        INIT_BUILTIN_MESSAGE_TYPES,
        URGENT_PRIORITY,
        CLEANUP_AFTER_DAYS,
        METRICS_DIR,
        METRICS_TOKEN,
        FLOWER_URL,
    )
}


def validate() -> None:
    """Checks every setting; raises ImproperlyConfigured for the first invalid one."""
    for setting in SETTINGS.values():
        setting.get()
    for alias, entry in MESSENGERS.get().items():
        if not isinstance(alias, str) or not isinstance(entry, dict | None):
            raise ImproperlyConfigured(
                f"{MESSENGERS.key} maps messenger aliases to dicts, got {alias!r}: {entry!r}"
            )


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as environment variables, as Django settings (name -> value)."""
    return {s.key: s.parse(environ[s.key]) for s in SETTINGS.values() if s.key in environ}


def unknown_settings(**_: Any) -> list[checks.CheckMessage]:
    """System check: a ``SITEMESSAGE_*`` setting that nothing reads is most likely a typo."""
    keys = [s.key for s in SETTINGS.values()]
    return [
        checks.Warning(
            f"{name} is not a sitemessage setting{did_you_mean(name, keys)}",
            hint=f"the settings are: {', '.join(keys)}",
            id="sitemessage.W001",
        )
        for name in dir(settings)
        if name.startswith(PREFIX) and name not in keys
    ]
