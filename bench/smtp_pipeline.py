"""E-mail throughput of the whole pipeline against the practical ceiling, in one run.

Baseline: one smtplib connection sending N e-mails to an aiosmtpd sink in another process (the
ceiling DESIGN.md measured at ~760-790/s on these machines). Pipeline: schedule_messages() for N
addresses, a real `celery worker -Q messenger.smtp -c 2` on Redis, until every dispatch row is
SENT. Prints both rates and their ratio.

    .venv/bin/python bench/smtp_pipeline.py [N]
"""

import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def baseline(port: int) -> float:
    conn = smtplib.SMTP("127.0.0.1", port)
    started = time.perf_counter()
    for i in range(N):
        email = EmailMessage()
        email["Subject"], email["From"], email["To"] = (
            "Bench",
            "bench@localhost",
            f"u{i}@example.com",
        )
        email.set_content("Numbers are up.")
        conn.sendmail("bench@localhost", [f"u{i}@example.com"], email.as_bytes())
    elapsed = time.perf_counter() - started
    conn.quit()
    return N / elapsed


def pipeline(port: int, var_dir: str) -> float:
    import django

    django.setup()
    from django.core.management import call_command

    from dispatcher.models import Dispatch
    from sitemessage.messages.email import EmailTextMessage
    from sitemessage.toolbox import recipients, schedule_messages

    call_command("migrate", verbosity=0)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "messenger.smtp",
         "-c", "2", "-n", "bench@%h", "--without-gossip", "--without-mingle", "-l", "WARNING"],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(4)  # worker start-up, outside the measurement
        started = time.perf_counter()
        schedule_messages(
            EmailTextMessage("Bench", "Numbers are up."),
            recipients("smtp", [f"u{i}@example.com" for i in range(N)]),
        )
        while Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() < N:
            if time.perf_counter() - started > 300:
                raise SystemExit("pipeline did not finish in 300 s")
            time.sleep(0.05)
        return N / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait()


def main() -> None:
    port = free_port()
    var_dir = tempfile.mkdtemp(prefix="sm-bench-")
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_SECRET_KEY="bench",
        SITEMESSAGE_VAR_DIR=var_dir,
        CELERY_BROKER_URL="redis://127.0.0.1:6379/9",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(port),
    )
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{port}",
            "-c",
            "aiosmtpd.handlers.Sink",
        ]
    )
    try:
        wait_port(port)
        raw = baseline(port)
        ours = pipeline(port, var_dir)
    finally:
        sink.terminate()
        sink.wait()
    print(f"e-mails: {N}")
    print(f"baseline (one smtplib connection):      {raw:7.0f} msg/s")
    print(f"pipeline (schedule -> Redis -> 2 procs): {ours:7.0f} msg/s")
    print(f"ratio pipeline/baseline:                 {ours / raw:7.2f}")


if __name__ == "__main__":
    main()
