"""One process against a distant SMTP server: the bench sink behind a local proxy that delays
every byte by RTT/2 each way, so round trips, not CPU, decide the rate. Prints msg/s of the
issue's baseline (smtplib ``sendmail()`` over one connection, pre-built messages), of the same
loop with MAIL, RCPT and DATA pipelined, and of this project's pipeline in one process
(``pipeline.deliver`` as a worker's task runs it, SQLite), each with its ratio to the baseline.

    .venv/bin/python bench/distant.py [--rtt-ms 10] [N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REDIS_URL,
    SPAWN,
    VAR_ROOT,
    Sink,
    addresses,
    clear,
    configure_django,
    email,
    free_port,
    purge_smtp_queues,
    script_database,
    smtp_rate,
    wait_port,
)


def delay_proxy(listen: int, target: int, one_way: float) -> None:
    """Forwards 127.0.0.1:listen to 127.0.0.1:target, each chunk delivered ``one_way`` seconds
    after it was read, in order (the proxy process's body)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(deliver())
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + one_way, data))
        queue.put_nowait((0.0, b""))
        await task

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        await server.serve_forever()

    asyncio.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=10.0)
    parser.add_argument("n", type=int, nargs="?", default=300)
    args = parser.parse_args()
    sink = Sink()
    with sink.running():
        port = free_port()
        proxy = SPAWN.Process(
            target=delay_proxy, args=(port, sink.port, args.rtt_ms / 2000), daemon=True
        )
        proxy.start()
        try:
            wait_port(port)
            sink.port = port  # every client below talks to the proxy
            base = smtp_rate(sink, 1, args.n)
            piped = smtp_rate(sink, 1, args.n, pipelined=True)
            ours = deliver_in_process(sink, args.n)
        finally:
            proxy.terminate()
            proxy.join(10)
    print(f"one process, one connection, SMTP round trip {args.rtt_ms:g} ms, {args.n} e-mails:")
    for name, rate in [
        ("smtplib sendmail(), pre-built (baseline)", base),
        ("the same, MAIL RCPT DATA pipelined", piped),
        ("this project: pipeline.deliver, SQLite", ours),
    ]:
        print(f"  {name:42} {rate:8.1f} msg/s  {rate / base:5.2f}x")


def deliver_in_process(sink: Sink, count: int) -> float:
    var = VAR_ROOT / "distant"
    configure_django(
        "config.settings", var, script_database("sqlite", var, "distant"), REDIS_URL, sink.port
    )
    from dispatcher import conf, pipeline, toolbox
    from dispatcher.models import Dispatch
    from messengers.base import warm_up
    from messengers.registry import get_registered_messenger_object

    clear()
    purge_smtp_queues()
    toolbox.schedule_messages(email(), toolbox.recipients("smtp", addresses(count, "d")))
    purge_smtp_queues()
    ids = list(Dispatch.objects.order_by("pk").values_list("pk", flat=True))
    size = conf.BATCH_SIZE.get()
    warm_up(get_registered_messenger_object("smtp"))
    first = sink.arrivals
    started = time.monotonic()
    for start in range(0, count, size):
        owner = pipeline.lease_owner(f"distant-{start}")
        pipeline.deliver("smtp", ids[start : start + size], owner, waiting=True)
    last = sink.wait_for(first + count, 60)
    return count / (last - started)


if __name__ == "__main__":
    main()
