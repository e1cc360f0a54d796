"""XMPP throughput: one warm session for every batch versus a login per batch.

Starts its own prosody on loopback (see tests/xmpp_server.py) and five recipient clients, then
sends N chat messages through XMPPSleekMessenger.send() in batches: once on a session opened
beforehand (what a worker process does: before_send() at process start), once with
before_send()/after_send() around every batch. A message counts when the server has
acknowledged it (XEP-0198); the recipients must have received all of them. Prints msg/s for
each and the ratio warm/per-batch, for batches of 100, 10 and 1; row 7 of bench/suite.py runs
compare() with batches of one.

    .venv/bin/python bench/xmpp_session.py [N]
"""

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench")

from messengers.xmpp import XMPPSleekMessenger
from tests.xmpp_server import ACCOUNTS, PASSWORD, SENDER, Prosody, Recipient

ADDRESSES = [f"rcpt{i}@localhost" for i in range(5)]
# A line per connection at INFO (messengers/xmpp.py keeps it there): hundreds of logins here.
logging.getLogger("slixmpp.xmlstream.xmlstream").setLevel(logging.WARNING)


def batches(run: int, count: int, size: int) -> list[tuple[Any, list[Any]]]:
    """``count`` fake (message, dispatches) pairs: send() reads only pk, address, message_cache."""
    result = []
    for start in range(0, count, size):
        message = SimpleNamespace(pk=run * 1_000_000 + start)
        dispatches = [
            SimpleNamespace(pk=i, address=ADDRESSES[i % 5], message_cache=f"bench {run} {i}")
            for i in range(start, min(start + size, count))
        ]
        result.append((message, dispatches))
    return result


def measure(messenger: XMPPSleekMessenger, work: list[tuple[Any, list[Any]]], warm: bool) -> float:
    """Messages per second of sending ``work``, on one session or with a login per batch."""
    if warm:
        messenger.before_send()  # at worker process start: not part of the measurement
    started = time.perf_counter()
    for message, dispatches in work:
        if not warm:
            messenger.before_send()
        messenger.send(None, message, dispatches)  # type: ignore[arg-type]
        if not warm:
            messenger.after_send()
    elapsed = time.perf_counter() - started
    if warm:
        messenger.after_send()
    statuses = {d.outcome.status for _, dispatches in work for d in dispatches}
    if statuses != {"sent"}:
        raise RuntimeError(f"not every message was acknowledged: {statuses}")
    return sum(len(dispatches) for _, dispatches in work) / elapsed


def compare(count: int, size: int, rounds: int) -> list[tuple[float, float]]:
    """(warm msg/s, login-per-batch msg/s) of ``count`` messages in batches of ``size``, per
    round, on a fresh prosody; checks that the recipients received every message."""
    server = Prosody(Path(tempfile.mkdtemp(prefix="sm-bench-xmpp-")) / "prosody")
    server.start()
    clients = [Recipient(a, ACCOUNTS[a.split("@")[0]], server.port).connect() for a in ADDRESSES]
    try:
        messenger = XMPPSleekMessenger(
            SENDER, PASSWORD, host="127.0.0.1", port=server.port, use_tls=False
        )
        result = [
            (
                measure(messenger, batches(2 * run, count, size), warm=True),
                measure(messenger, batches(2 * run + 1, count, size), warm=False),
            )
            for run in range(rounds)
        ]
        expected = 2 * rounds * count
        for client in clients:
            client.wait_for(expected // len(clients), timeout=30)
        received = sum(len(client.received()) for client in clients)
        if received != expected:
            raise RuntimeError(f"recipients got {received} messages, expected {expected}")
        return result
    finally:
        for client in clients:
            client.close()
        server.stop()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    print(f"{count} XMPP messages, acknowledged by prosody and received by 5 clients:")
    for size in (100, 10, 1):
        [(kept, per_batch)] = compare(count, size, 1)
        print(
            f"  batches of {size:>3}: warm session {kept:7.0f} msg/s, "
            f"login per batch {per_batch:7.0f} msg/s, warm/per-batch {kept / per_batch:5.1f}x"
        )


if __name__ == "__main__":
    main()
