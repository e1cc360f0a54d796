"""Packaging: the wheel built by ``python -m build`` holds the whole framework, and a separate
Django project that installs it, with nothing of this repository on its path, migrates, runs
``celery -A workers`` and delivers e-mail; a project with a Celery app of its own serves our
tasks through ``workers.embed.serve(app)``.

The fresh virtualenv gets the wheel from pip (``--no-index``) and, as its only other packages,
links to the distributions in this repository's .venv that the wheel's core requirements
(no extras) need, found from the wheel's own metadata: so the core runs with exactly what it
declares, offline, without downloading anything. The wheel is built without build isolation
(the setuptools of requirements-dev.txt) from a copy of the sources, so no build/ or
*.egg-info lands in the checkout.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import uuid
import zipfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT, WorkerProcess, free_port, purge, wait_until

PACKAGES = ("dispatcher", "messengers", "workers", "sitemessage")
#: What the build reads besides the packages.
BUILD_INPUTS = ("pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the build reads (other engineers may be adding files to the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return src


@pytest.fixture(scope="module")
def wheel(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # The default route: an sdist first, then the wheel built from the unpacked sdist, so a
    # file missing from the sdist would be missing from the wheel too.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(sources)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "WARNING" not in built.stdout + built.stderr, built.stdout + built.stderr
    [path] = dist.glob("*.whl")
    return path


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": e}) for e in ("", *extras))


def dependency_closure(requires: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions (of this .venv) that ``requires`` needs, with their own
    requirements, extras included; fails when one is missing or of the wrong version."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [r for r in map(Requirement, requires) if applies(r, frozenset())]
    while todo:
        requirement = todo.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = metadata.distribution(name)
        assert requirement.specifier.contains(dist.version, prereleases=True), (requirement, dist)
        found[name] = dist
        todo += [r for r in map(Requirement, dist.requires or []) if applies(r, extras)]
    return found


def link_distribution(dist: metadata.Distribution, site: Path) -> None:
    """Makes ``dist`` importable (and known to pip as installed) in ``site``."""
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops - {"__pycache__"}:
        target = site / top
        if not target.exists():
            target.symlink_to(Path(str(dist.locate_file(top))))


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed and the core requirements only."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    core = wheel_metadata(wheel).get_all("Requires-Dist") or []
    for dist in dependency_closure(core).values():
        link_distribution(dist, site)
    # With its dependencies (no --no-deps): pip must find each one satisfied, or fail.
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", str(wheel)],
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return path


SETTINGS = """\
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "a-test-project"
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "sitemessage", "shop"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",
        "OPTIONS": {"timeout": 30},
    }
}
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
USE_TZ = True
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]  # read by the project's own Celery app
SITEMESSAGE_SWEEP_INTERVAL = 0.5
# When the sweep publishes a stored dispatch whose publish was lost (read by the process that
# schedules it).
SITEMESSAGE_REPUBLISH_AFTER = float(os.environ.get("REPUBLISH_AFTER", "300"))
"""

SITEMESSAGES = """\
import os

from sitemessage.messengers.smtp import SMTPMessenger
from sitemessage.utils import register_messenger_objects

register_messenger_objects(
    SMTPMessenger(from_email="shop@example.com", host="127.0.0.1", port=int(os.environ["SMTP_PORT"]))
)
"""

SEND = """\
import sys

import django

django.setup()

from sitemessage.messages.email import EmailTextMessage
from sitemessage.toolbox import recipients, schedule_messages

subject, address = sys.argv[1:]
schedule_messages(EmailTextMessage(subject, "Sent by an installed package."), recipients("smtp", [address]))
"""

OWN_CELERY_APP = """\
import os

from celery import Celery

from workers.embed import serve

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
app = Celery("mysite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
serve(app)
"""


def make_project(root: Path, own_celery_app: bool) -> Path:
    """A minimal Django project: mysite (settings, and our Celery app or one of its own) and an
    app ``shop`` whose sitemessages.py registers an SMTPMessenger."""
    files = {
        "mysite/__init__.py": "from .celery import app as celery_app\n"
        if own_celery_app
        else "from workers.app import app as celery_app\n",
        "mysite/settings.py": SETTINGS,
        "shop/__init__.py": "",
        "shop/sitemessages.py": SITEMESSAGES,
        "send.py": SEND,
    }
    if own_celery_app:
        files["mysite/celery.py"] = OWN_CELERY_APP
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


class Project:
    """Runs the venv's python in the project directory with a minimal environment: no
    PYTHONPATH, nothing of this repository."""

    def __init__(self, venv: Path, root: Path, smtp_port: int) -> None:
        self.python = str(venv / "bin" / "python")
        self.root = root
        self.env = {
            "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(root),
            "DJANGO_SETTINGS_MODULE": "mysite.settings",
            "CELERY_BROKER_URL": os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            "SMTP_PORT": str(smtp_port),
        }

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, *args],
            cwd=self.root,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def check(self, *args: str, **env: str) -> str:
        done = self.run(*args, **env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr


@pytest.fixture
def start_project_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(project: Project, app: str, queues: list[str], *options: str) -> WorkerProcess:
        purge(queues)
        log = tmp_path / f"worker-{len(started)}.log"
        cmd = [
            project.python, "-m", "celery", "-A", app, "worker", "-Q", ",".join(queues),
            "-c", "1", "-n", f"pkg-{uuid.uuid4().hex[:8]}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO", *options,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=project.root, env=project.env, stdout=out, stderr=subprocess.STDOUT
            )
        worker = WorkerProcess(proc, log, app)
        started.append(worker)
        deadline = time.monotonic() + 60
        while " ready." not in worker.text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{worker.text()[-3000:]}")
            time.sleep(0.1)
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_the_wheel_holds_every_file_of_the_packages_and_nothing_else(sources, wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = {n for n in archive.namelist() if ".dist-info/" not in n}
    sources = {
        path.relative_to(sources).as_posix()
        for package in PACKAGES
        for path in (sources / package).rglob("*")
        if path.is_file()
    }
    assert names == sources
    assert "workers/celeryconfig.py" in names and "sitemessage/apps.py" in names
    assert any(n.startswith("dispatcher/templates/sitemessage/messages/") for n in names)
    assert any(n.startswith("dispatcher/migrations/0001") for n in names)

    meta = wheel_metadata(wheel)
    assert meta["Name"] == "sitemessage-celery"
    extras = {"xmpp", "twitter", "telegram", "facebook", "vkontakte"}
    assert set(meta.get_all("Provides-Extra") or []) == extras
    core = {Requirement(r).name for r in meta.get_all("Requires-Dist") or [] if ";" not in r}
    # No test, lint or channel library: the commands' progress bars and the metrics only.
    assert core == {"Django", "celery", "kombu", "redis", "tqdm", "prometheus-client"}


@pytest.mark.e2e
def test_an_installed_project_delivers_an_email_with_celery_dash_a_workers(
    venv, tmp_path, smtp_server, start_project_worker
):
    sink, port = smtp_server
    project = Project(venv, make_project(tmp_path / "project", own_celery_app=False), port)

    # Nothing of this repository: our packages come from the venv, the checkout is not on the
    # path, and the core imports without the extras' libraries.
    probe = textwrap.dedent("""\
        import importlib, json, sys
        out = {"path": sys.path, "files": {}, "missing": {}}
        for name in ("dispatcher", "messengers", "workers", "sitemessage"):
            out["files"][name] = importlib.import_module(name).__file__
        for name in ("config", "celeryconfig", "tests", "slixmpp", "tweepy", "requests",
                     "messengers.xmpp", "messengers.twitter", "messengers.telegram"):
            try:
                importlib.import_module(name)
            except ImportError as exc:
                out["missing"][name] = str(exc)
        print(json.dumps(out))
    """)
    seen = json.loads(project.check("-c", probe))
    assert all(Path(f).is_relative_to(venv) for f in seen["files"].values()), seen["files"]
    assert not [p for p in seen["path"] if p and Path(p).resolve().is_relative_to(ROOT)]
    assert set(seen["missing"]) == {
        "config", "celeryconfig", "tests", "slixmpp", "tweepy", "requests",
        "messengers.xmpp", "messengers.twitter", "messengers.telegram",
    }  # fmt: skip
    for module, extra in [("xmpp", "xmpp"), ("twitter", "twitter"), ("telegram", "telegram")]:
        assert (
            f"pip install 'sitemessage-celery[{extra}]'" in seen["missing"][f"messengers.{module}"]
        )

    # Installed, the app of `celery -A workers` guesses no settings module (a project's own
    # config.settings, say), it names the variable to set.
    unset = {k: v for k, v in project.env.items() if k != "DJANGO_SETTINGS_MODULE"}
    guessed = subprocess.run(
        [project.python, "-c", "import workers.app"],
        cwd=project.root, env=unset, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "ImproperlyConfigured: celery -A workers: set DJANGO_SETTINGS_MODULE" in guessed.stderr

    migrated = project.check("-m", "django", "migrate")
    assert "Applying sitemessage.0001_initial... OK" in migrated

    worker = start_project_worker(project, "workers", ["messenger.smtp"])
    project.check("send.py", "Hello from a package", "ann@example.com")

    sink.wait_for(1, timeout=30)
    [(rcpts, mail)] = sink.messages
    assert rcpts == ["ann@example.com"]
    assert mail["Subject"] == "Hello from a package"
    assert mail["From"] == "shop@example.com"
    assert mail.get_payload().strip() == "Sent by an installed package."  # the packaged template
    assert wait_until(lambda: "1 sent" in worker.text(), timeout=15), worker.text()[-3000:]
    # The packaged management commands run too.
    project.check("-m", "django", "sitemessage_check_undelivered")


@pytest.mark.e2e
def test_a_project_with_its_own_celery_app_serves_our_tasks(
    venv, tmp_path, smtp_servers, start_project_worker
):
    server = smtp_servers(start=False)
    project = Project(venv, make_project(tmp_path / "project", own_celery_app=True), server.port)
    project.check("-m", "django", "migrate")

    # Autodiscovery found our tasks; serve() added our task options and the sweep to beat.
    configured = json.loads(
        project.check(
            "-c",
            "import json, django; django.setup(); from mysite.celery import app; "
            "app.loader.import_default_modules(); task = app.tasks['dispatcher.send_dispatches']; "
            "print(json.dumps([task.acks_late, task.reject_on_worker_lost, "
            "app.conf.beat_schedule['sitemessage-sweep']['task']]))",
        )
    )
    assert configured == [True, True, "dispatcher.sweep"]

    # One worker of the project's app with its beat, consuming our queues beside its own.
    worker = start_project_worker(
        project, "mysite", ["celery", "sitemessage", "messenger.smtp"],
        "-B", "-s", str(tmp_path / "beat-schedule"),
    )  # fmt: skip
    # The lifecycle runs in the project's worker: its process warmed smtp at start (the server
    # is down, so the warm-up leaves this line), before any task came.
    assert wait_until(lambda: "messenger smtp did not warm up" in worker.text(), timeout=15)
    server.start()

    # Published by the project's app from a Django process: routed to messenger.smtp.
    project.check("send.py", "Published", "ann@example.com")
    server.sink.wait_for(1, timeout=30)
    assert server.sink.recipients() == ["ann@example.com"]

    # A publish lost (broker unreachable): the sweep that serve() put in beat delivers it.
    lost = project.check(
        "send.py",
        "Swept",
        "bob@example.com",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
        REPUBLISH_AFTER="0.5",
    )
    assert "could not publish 1 smtp dispatches" in lost
    server.sink.wait_for(2, timeout=30)
    assert server.sink.recipients() == ["ann@example.com", "bob@example.com"]
    assert "dispatcher.sweep" in worker.text()


def test_requirements_txt_pins_what_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    pinned = {
        canonicalize_name(r.name): r
        for r in (
            Requirement(line.split("#")[0].strip())
            for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")
        )
    }
    for text in declared:
        requirement = Requirement(text)
        pin = pinned[canonicalize_name(requirement.name)]
        assert (pin.specifier, pin.extras) == (requirement.specifier, requirement.extras), text
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev
    for tool in ("pytest", "ruff", "mypy", "import-linter", "build"):
        assert tool not in pinned and f"\n{tool}" in dev


def test_sitemessage_in_installed_apps_is_the_dispatcher_app(tmp_path):
    script = textwrap.dedent("""\
        import json, sys
        import django
        from django.conf import settings
        settings.configure(
            INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", *sys.argv[1:]],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        )
        try:
            django.setup()
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            raise SystemExit
        from django.apps import apps
        from django.core.management import get_commands
        from django.db.migrations.loader import MigrationLoader
        from dispatcher.models import Dispatch
        config = apps.get_app_config("sitemessage")
        print(json.dumps({
            "name": config.name,
            "model_label": Dispatch._meta.label,
            "migrations": sorted(n for a, n in MigrationLoader(None).disk_migrations if a == "sitemessage"),
            "commands": sorted(c for c, app in get_commands().items() if app == "dispatcher"),
        }))
    """)

    def setup(*apps: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", script, *apps],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
            env={k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    as_upstream, as_ours = setup("sitemessage"), setup("dispatcher")
    assert as_upstream == as_ours
    assert (
        as_upstream["name"] == "dispatcher" and as_upstream["model_label"] == "sitemessage.Dispatch"
    )
    assert "0001_initial" in as_upstream["migrations"]
    assert "sitemessage_probe" in as_upstream["commands"]
    assert "duplicates: sitemessage" in setup("sitemessage", "dispatcher")["error"]


@pytest.mark.parametrize("configured_before", [False, True])
def test_serve_adds_the_sweep_and_our_task_options_and_keeps_the_projects(configured_before):
    from celery import Celery

    import dispatcher.tasks  # noqa: F401  (the shared tasks every app gets)
    from workers.embed import serve

    app = Celery("project", set_as_current=False)
    app.config_from_object(
        {
            "task_annotations": {"dispatcher.sweep": {"rate_limit": "1/s"}},
            "beat_schedule": {"theirs": {"task": "project.report", "schedule": 60}},
        }
    )
    if configured_before:
        assert app.conf.task_default_queue == "celery"  # reading a setting configures the app
    serve(app)

    assert set(app.conf.beat_schedule) == {"theirs", "sitemessage-sweep"}
    sweep = app.conf.beat_schedule["sitemessage-sweep"]
    assert (sweep["task"], sweep["options"]) == (
        "dispatcher.sweep",
        {"queue": "sitemessage", "expires": 60},
    )
    send = app.tasks["dispatcher.send_dispatches"]
    assert (send.acks_late, send.reject_on_worker_lost, send.time_limit) == (True, True, 300)
    # The project's own annotation of a task of ours wins over ours.
    assert app.tasks["dispatcher.sweep"].rate_limit == "1/s"
    assert not app.tasks["dispatcher.sweep"].acks_late
