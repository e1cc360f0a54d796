"""dispatcher.conf: every SITEMESSAGE_* setting has a default, a type and a line in README; a
bad value stops manage.py, workers and beat at startup, naming the setting and the value."""

from __future__ import annotations

import re

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from dispatcher import conf
from dispatcher.models import Dispatch, Message
from dispatcher.sweep import sweep
from sitemessage.toolbox import recipients, schedule_messages
from tests.faultsapp.helpers import manage
from tests.support import ROOT, free_port, run_python

BAD_VALUES = [
    ("BATCH_SIZE", 0, "must be at least 1"),
    ("BATCH_SIZE", "100", "must be an integer"),
    ("BATCH_SIZE", True, "must be an integer"),
    ("LEASE_SECONDS", -1, "must be at least"),
    ("RETRY_BACKOFF", float("nan"), "must be a finite number"),
    ("OUTCOME_CHUNK", 2.5, "must be an integer"),
    ("SWEEP_INTERVAL", 0, "must be at least 0.1"),
    ("RATE_LIMIT_REDIS_URL", "http://cache:6379", "must start with redis://"),
    ("SHORTCUT_EMAIL_MESSENGER_TYPE", "", "must not be empty"),
    ("MESSENGERS", ["smtp"], "must be a dict"),
    ("MESSENGERS", {"smtp": "yes"}, "maps messenger aliases to dicts"),
]


def test_the_readme_configuration_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `(SITEMESSAGE_[A-Z_]+)`", readme, re.MULTILINE))
    assert len(conf.SETTINGS) >= 14
    assert sorted(s.key for s in conf.SETTINGS.values() if s.key not in rows) == []


def test_the_defaults_are_valid():
    with override_settings(**{s.key: s.default for s in conf.SETTINGS.values()}):
        conf.validate()


@pytest.mark.parametrize("name, value, problem", BAD_VALUES)
def test_a_bad_value_is_refused_naming_the_setting_and_the_value(name, value, problem):
    with override_settings(**{f"SITEMESSAGE_{name}": value}):
        with pytest.raises(ImproperlyConfigured) as info:
            conf.validate()
    message = str(info.value)
    assert message.startswith(f"SITEMESSAGE_{name} ") and problem in message
    assert message.endswith(f"got {value!r}") or "maps messenger aliases" in message


def test_settings_are_read_when_used(settings):
    settings.SITEMESSAGE_BATCH_SIZE = 7
    assert conf.BATCH_SIZE.get() == 7
    del settings.SITEMESSAGE_BATCH_SIZE
    assert conf.BATCH_SIZE.get() == 100


def test_environment_values_are_typed_and_bad_ones_kept_for_validation():
    values = conf.from_environment(
        {
            "SITEMESSAGE_BATCH_SIZE": "50",
            "SITEMESSAGE_LEASE_SECONDS": "2.5",
            "SITEMESSAGE_MESSENGERS": '{"smtp": {}}',
            "SITEMESSAGE_RATE_LIMIT_REDIS_URL": "",
            "SITEMESSAGE_SWEEP_LIMIT": "lots",
            "UNRELATED": "1",
        }
    )
    assert values == {
        "SITEMESSAGE_BATCH_SIZE": 50,
        "SITEMESSAGE_LEASE_SECONDS": 2.5,
        "SITEMESSAGE_MESSENGERS": {"smtp": {}},
        "SITEMESSAGE_RATE_LIMIT_REDIS_URL": None,
        "SITEMESSAGE_SWEEP_LIMIT": "lots",  # refused by validate(), by name
    }


def test_an_unknown_sitemessage_setting_is_a_system_check_warning(settings):
    settings.SITEMESSAGE_BACTH_SIZE = 10
    [warning] = conf.unknown_settings()
    assert warning.id == "sitemessage.W001"
    assert "SITEMESSAGE_BACTH_SIZE" in warning.msg and "'SITEMESSAGE_BATCH_SIZE'" in warning.msg


@pytest.mark.django_db
def test_a_setting_made_invalid_at_run_time_fails_before_anything_is_written(no_publish):
    with override_settings(SITEMESSAGE_BATCH_SIZE=0):
        with pytest.raises(ImproperlyConfigured, match="SITEMESSAGE_BATCH_SIZE"):
            schedule_messages("hello", recipients("smtp", ["a@example.com"]))
    assert not Message.objects.exists() and not Dispatch.objects.exists()


@pytest.mark.django_db
def test_the_sweep_does_not_report_a_bad_setting_as_a_broker_failure(caplog):
    schedule_messages("hello", recipients("smtp", ["a@example.com"]))
    Dispatch.objects.update(next_attempt_at=None)
    with override_settings(SITEMESSAGE_BATCH_SIZE=0):
        with pytest.raises(ImproperlyConfigured, match="SITEMESSAGE_BATCH_SIZE"):
            sweep()
    assert "could not publish" not in caplog.text


@pytest.mark.parametrize("value", ["0", "many"])
def test_manage_py_check_stops_on_a_bad_setting(value):
    done = manage("check", env={"SITEMESSAGE_BATCH_SIZE": value})
    assert done.returncode != 0
    assert "ImproperlyConfigured: SITEMESSAGE_BATCH_SIZE must be" in done.stderr
    assert f"got {int(value) if value.isdigit() else value!r}" in done.stderr


@pytest.mark.django_db
@pytest.mark.parametrize(
    "command",
    [
        ["worker", "-Q", "messenger.smtp", "-c", "1", "--without-gossip", "--without-mingle"],
        ["beat", "-s", "{tmp}/beat-schedule"],
    ],
    ids=["worker", "beat"],
)
def test_workers_and_beat_stop_on_a_bad_setting(command, tmp_path):
    # The broker is a port nobody listens on: the process must stop before it would connect.
    env = {"SITEMESSAGE_BATCH_SIZE": "0", "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}"}
    args = [arg.format(tmp=tmp_path) for arg in command]
    done = run_python("-m", "celery", "-A", "workers", *args, env=env)
    assert done.returncode != 0
    assert "ImproperlyConfigured: SITEMESSAGE_BATCH_SIZE must be at least 1, got 0" in done.stderr
