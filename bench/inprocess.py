"""The worker's share per dispatch, measured in one process with no Celery in the way: N
dispatches are scheduled (tasks dropped), then delivered through ``pipeline.deliver`` to the
bench sink (its own process), as a worker's task would; prints wall and CPU time per dispatch.

    .venv/bin/python bench/inprocess.py [--db sqlite|postgres] [--ones] [--profile] [N]

``--ones``: N one-recipient messages, delivered as a stream of doorbell tasks (each task
carries one id and claims the waiting rows up to a batch); otherwise one message to N
recipients in tasks of BATCH_SIZE ids. ``--profile`` prints cProfile's top functions. Worker
connections commit as the worker's do (SITEMESSAGE_WORKER_SYNCHRONOUS_COMMIT). Used to profile
before each change of issue 11 (bench/RESULTS.md); the suite (bench/suite.py) is the record.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REDIS_URL,
    VAR_ROOT,
    Sink,
    addresses,
    clear,
    configure_django,
    email,
    purge_smtp_queues,
    script_database,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--ones", action="store_true", help="N one-recipient messages")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("n", type=int, nargs="?", default=5000)
    args = parser.parse_args()
    sink = Sink()
    with sink.running():
        var = VAR_ROOT / "inprocess"
        url = script_database(args.db, var, "inprocess")
        configure_django("config.settings", var, url, REDIS_URL, sink.port)
        from dispatcher import conf, pipeline, toolbox
        from dispatcher.models import Dispatch
        from messengers.base import warm_up
        from messengers.registry import get_registered_messenger_object

        clear()
        purge_smtp_queues()
        if args.ones:
            for address in addresses(args.n):
                toolbox.schedule_messages(email(), toolbox.recipients("smtp", [address]))
        else:
            toolbox.schedule_messages(email(), toolbox.recipients("smtp", addresses(args.n)))
        purge_smtp_queues()
        ids = list(Dispatch.objects.order_by("pk").values_list("pk", flat=True))
        size = conf.BATCH_SIZE.get()
        warm_up(get_registered_messenger_object("smtp"))
        pipeline.relax_commits()
        profile = cProfile.Profile() if args.profile else None
        wall, cpu = time.perf_counter(), time.process_time()
        if profile:
            profile.enable()
        for start in range(0, args.n, size):
            batch = ids[start : start + 1] if args.ones else ids[start : start + size]
            owner = pipeline.lease_owner(f"inprocess-{start}")
            pipeline.deliver("smtp", batch, owner, waiting=True)  # as a worker's task does
        if profile:
            profile.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        sink.wait_for(args.n, 30)
        kind = "one-recipient messages" if args.ones else "recipients of one message"
        print(
            f"{args.db}: {args.n:,} {kind}, batch {size}: {1000 * wall / args.n:.3f} ms wall, "
            f"{1000 * cpu / args.n:.3f} ms CPU per dispatch ({args.n / wall:,.0f}/s)"
        )
        if profile:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        purge_smtp_queues()


if __name__ == "__main__":
    main()
