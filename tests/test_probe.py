"""``manage.py sitemessage_probe``: a real send through a real server, and honest exit codes."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from messengers.registry import register_messenger_objects
from messengers.twitter import TwitterMessenger
from tests.support import ROOT, free_port


def probe(*args: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(port),
    }
    return subprocess.run(
        [sys.executable, "manage.py", "sitemessage_probe", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_probe_sends_through_the_server_and_exits_zero(smtp_server):
    sink, port = smtp_server
    done = probe("smtp", "--to", "ops@example.com", "--text", "are you there?", port=port)
    assert done.returncode == 0, done.stderr
    assert "smtp: test message to ops@example.com sent" in done.stdout
    [(rcpts, email)] = sink.messages
    assert rcpts == ["ops@example.com"]
    assert email.get_payload().strip() == "are you there?"
    assert email["Message-ID"] in done.stdout  # the provider id is shown
    # django-sitemessage's lines
    assert f"Probing function result: {email['Message-ID']}." in done.stdout
    assert done.stdout.splitlines()[-1] == "Probing done."


def test_probe_without_to_says_smtp_needs_an_address(smtp_server):
    sink, port = smtp_server
    done = probe("smtp", port=port)
    assert done.returncode == 1 and "smtp needs an address: pass --to" in done.stderr
    assert sink.messages == [] and "Traceback" not in done.stderr


@pytest.mark.django_db
def test_probe_without_to_posts_where_the_messenger_can(twitter_api, registries):
    register_messenger_objects(TwitterMessenger(**twitter_api.options()))
    out = io.StringIO()

    call_command("sitemessage_probe", "twitter", "--text", "probe", stdout=out)

    [tweet] = twitter_api.tweets
    assert tweet["text"] == "probe" and not tweet["mention"]  # no mention: a timeline post
    assert f"Probing function result: {tweet['id']}." in out.getvalue()


def test_probe_exits_non_zero_when_the_server_is_down():
    done = probe("smtp", "--to", "ops@example.com", port=free_port())
    assert done.returncode == 1
    assert "smtp: test message to ops@example.com failed" in done.stderr
    assert "cannot connect to SMTP server 127.0.0.1" in done.stderr


def test_probe_exits_non_zero_on_a_rejected_recipient(smtp_server):
    sink, port = smtp_server
    sink.reject["gone@example.com"] = "550 5.1.1 no such user"
    done = probe("smtp", "--to", "gone@example.com", port=port)
    assert done.returncode == 1 and "550" in done.stderr and sink.messages == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["nosuch", "--to", "a@example.com"], "'nosuch'"),
        (["smtp", "--to", "not an address"], "not a valid e-mail address"),
    ],
)
def test_probe_refuses_bad_input_before_sending(args, error):
    with pytest.raises(CommandError, match=error):
        call_command("sitemessage_probe", *args)
