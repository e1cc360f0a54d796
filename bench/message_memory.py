"""Worker memory and database size for one large message to many recipients (issue 8 #5).

One real `celery worker -Q messenger.smtp -c 1` on Redis and SQLite per row, a fresh process
each time (its peak RSS, VmHWM, is since start), an aiosmtpd sink in another process. Rows:

- baseline: N recipients of a 1 KB message;
- shared: N recipients of a 1 MB message whose type has no dynamic context (rendered once per
  batch, one body in memory, nothing stored per dispatch): what this project does;
- per recipient: the same 1 MB message through a type with ``has_dynamic_context = True``
  (rendered and stored per dispatch): what every message cost before.

Prints peak RSS of the pool process, bytes of bodies stored, seconds, and ratios to the
baseline, measured in the same run.

    .venv/bin/python bench/message_memory.py [N]
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
MB = 1024 * 1024
LOG = open(os.environ.get("BENCH_WORKER_LOG", os.devnull), "ab")

from bench.smtp_pipeline import free_port, wait_port  # noqa: E402


def peak_rss(pid: int) -> int:
    """Peak resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def pool_process(worker: subprocess.Popen) -> int:
    for _ in range(100):
        out = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True)
        if out.stdout.split():
            return int(out.stdout.split()[0])
        time.sleep(0.1)
    raise SystemExit("the worker started no pool process")


def run(message_type: str, size: int) -> tuple[int, int, int, float]:
    """Delivers one message of about ``size`` bytes to N recipients; returns the pool process's
    RSS at idle and at peak, the body bytes stored, and the seconds it took."""
    from django.db import connection
    from django.db.models import Sum
    from django.db.models.functions import Length

    from dispatcher.messages import get_registered_message_type
    from dispatcher.models import Dispatch, DispatchError, Message
    from sitemessage.toolbox import recipients, schedule_messages

    Dispatch.objects.all().delete()
    Message.objects.all().delete()
    connection.close()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "messenger.smtp",
         "-c", "1", "-n", f"mem-{message_type}@%h", "--without-gossip", "--without-mingle",
         "-l", "WARNING"],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=LOG,
    )  # fmt: skip
    try:
        child = pool_process(worker)
        time.sleep(3)  # start-up and warm-up, outside the measurement
        idle = peak_rss(child)
        line = "All figures are up this quarter; details follow in the attachment.\n"
        text = line * (size // len(line))
        message_cls: Any = get_registered_message_type(message_type)  # an e-mail type
        message = message_cls("Large newsletter", text)
        started = time.perf_counter()
        schedule_messages(message, recipients("smtp", [f"r{i}@example.com" for i in range(N)]))
        while Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() < N:
            error = DispatchError.objects.first()
            if error is not None or time.perf_counter() - started > 600:
                raise SystemExit(f"{message_type}: not delivered: {error or 'timeout'}")
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        stored = Dispatch.objects.aggregate(n=Sum(Length("message_cache")))["n"] or 0
        return idle, peak_rss(child), stored, seconds
    finally:
        worker.terminate()
        worker.wait()


def main() -> None:
    port = free_port()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.settings",  # the test apps hold the per-recipient type
        DJANGO_SECRET_KEY="bench",
        SITEMESSAGE_VAR_DIR=tempfile.mkdtemp(prefix="sm-bench-mem-"),
        CELERY_BROKER_URL="redis://127.0.0.1:6379/9",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(port),
    )
    sink = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
         "-c", "aiosmtpd.handlers.Sink"]
    )  # fmt: skip
    try:
        wait_port(port)
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        rows = {
            "baseline: 1 KB message": run("email_plain", 1024),
            "shared body: 1 MB message": run("email_plain", MB),
            "per recipient: 1 MB message": run("email_per_recipient", MB),
        }
    finally:
        sink.terminate()
        sink.wait()
    base_peak = rows["baseline: 1 KB message"][1]
    print(f"recipients: {N}, one worker pool process, Redis, SQLite")
    print(f"{'row':30} {'idle MB':>8} {'peak MB':>8} {'peak/base':>9} {'stored MB':>9} {'s':>6}")
    for name, (idle, peak, stored, seconds) in rows.items():
        print(
            f"{name:30} {idle / MB:8.1f} {peak / MB:8.1f} {peak / base_peak:9.2f} "
            f"{stored / MB:9.1f} {seconds:6.1f}"
        )


if __name__ == "__main__":
    main()
