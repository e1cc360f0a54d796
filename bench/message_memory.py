"""Worker memory and database size for one large message to many recipients (issue 8 #5).

One real `celery worker -Q messenger.smtp -c 1` on Redis and SQLite per row, a fresh process
each time (its peak RSS, VmHWM, is since start), the sink of bench/common.py. Rows:

- baseline: N recipients of a 1 KB message;
- shared: N recipients of a 1 MB message whose type has no dynamic context (rendered once per
  batch, one body in memory, nothing stored per dispatch): what this project does;
- per recipient: the same 1 MB message through a type with ``has_dynamic_context = True``
  (rendered and stored per dispatch): what every message cost before.

Prints peak RSS of the pool process, bytes of bodies stored, seconds, and ratios to the
baseline, measured in the same run. Row 6 of bench/suite.py measures the shared body alone.

    .venv/bin/python bench/message_memory.py [N]
"""

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MB,
    REDIS_URL,
    VAR_ROOT,
    Sink,
    addresses,
    configure_django,
    deliver_bulk,
    memory,
    start_worker,
    text_of,
)


def run(
    sink: Sink, log: Path, message_type: str, size: int, count: int
) -> tuple[int, int, int, float]:
    """Delivers one message of about ``size`` bytes to ``count`` recipients in a fresh worker;
    returns the pool process's RSS at idle and at peak, the body bytes stored, and seconds."""
    from django.db.models import Sum
    from django.db.models.functions import Length

    from dispatcher.messages import get_registered_message_type
    from dispatcher.models import Dispatch

    worker = start_worker(sink, 1, log)
    try:
        pool = worker.pool()[0]
        idle = memory(pool, "VmHWM")
        message_cls: Any = get_registered_message_type(message_type)  # an e-mail type
        message = message_cls("Large newsletter", text_of(size))
        seconds = deliver_bulk(sink, addresses(count, "r"), message)
        stored = Dispatch.objects.aggregate(n=Sum(Length("message_cache")))["n"] or 0
        return idle, memory(pool, "VmHWM"), stored, seconds
    finally:
        worker.stop()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    var_dir = VAR_ROOT / f"memory-{time.strftime('%Y%m%d-%H%M%S')}"
    with Sink().running() as sink:
        # The test apps hold the per-recipient type.
        configure_django(
            "tests.settings", var_dir, f"sqlite:///{var_dir / 'db.sqlite3'}", REDIS_URL, sink.port
        )
        log = var_dir / "worker.log"
        rows = {
            "baseline: 1 KB message": run(sink, log, "email_plain", 1024, count),
            "shared body: 1 MB message": run(sink, log, "email_plain", MB, count),
            "per recipient: 1 MB message": run(sink, log, "email_per_recipient", MB, count),
        }
    base_peak = rows["baseline: 1 KB message"][1]
    print(f"recipients: {count}, one worker pool process, Redis, SQLite")
    print(f"{'row':30} {'idle MB':>8} {'peak MB':>8} {'peak/base':>9} {'stored MB':>9} {'s':>6}")
    for name, (idle, peak, stored, seconds) in rows.items():
        print(
            f"{name:30} {idle / MB:8.1f} {peak / MB:8.1f} {peak / base_peak:9.2f} "
            f"{stored / MB:9.1f} {seconds:6.1f}"
        )


if __name__ == "__main__":
    main()
