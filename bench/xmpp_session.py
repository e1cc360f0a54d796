"""XMPP throughput: one warm session for every batch versus a login per batch.

Starts its own prosody on loopback (see tests/xmpp_server.py) and five recipient clients, then
sends N chat messages through XMPPSleekMessenger.send() in batches of 100 and of 10: once on a
session opened beforehand (what a worker process does: before_send() at process start), once
with before_send()/after_send() around every batch. A message counts when the server has
acknowledged it (XEP-0198); the recipients must have received all of them. Prints msg/s for
each and the ratio warm/per-batch.

    .venv/bin/python bench/xmpp_session.py [N]
"""

import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 500

from messengers.xmpp import XMPPSleekMessenger  # noqa: E402
from tests.xmpp_server import ACCOUNTS, PASSWORD, SENDER, Prosody, Recipient  # noqa: E402

ADDRESSES = [f"rcpt{i}@localhost" for i in range(5)]


def batches(run: int, size: int) -> list[tuple[Any, list[Any]]]:
    """N fake (message, dispatches) pairs: send() reads only pk, address and message_cache."""
    result = []
    for start in range(0, N, size):
        message = SimpleNamespace(pk=run * 100000 + start)
        dispatches = [
            SimpleNamespace(pk=i, address=ADDRESSES[i % 5], message_cache=f"bench {run} {i}")
            for i in range(start, min(start + size, N))
        ]
        result.append((message, dispatches))
    return result


def measure(messenger: XMPPSleekMessenger, run: int, size: int, warm: bool) -> float:
    work = batches(run, size)
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
        raise SystemExit(f"run {run}: not every message was acknowledged: {statuses}")
    return N / elapsed


def main() -> None:
    server = Prosody(Path(tempfile.mkdtemp(prefix="sm-bench-xmpp-")) / "prosody")
    server.start()
    clients = [Recipient(a, ACCOUNTS[a.split("@")[0]], server.port).connect() for a in ADDRESSES]
    try:
        messenger = XMPPSleekMessenger(
            SENDER, PASSWORD, host="127.0.0.1", port=server.port, use_tls=False
        )
        rates = {}
        for run, (size, warm) in enumerate([(100, True), (100, False), (10, True), (10, False)]):
            rates[size, warm] = measure(messenger, run, size, warm)
        expected = 4 * N
        for client in clients:
            client.wait_for(expected // 5, timeout=30)
        received = sum(len(client.received()) for client in clients)
        if received != expected:
            raise SystemExit(f"recipients got {received} messages, expected {expected}")
    finally:
        for client in clients:
            client.close()
        server.stop()

    print(f"{N} XMPP messages, acknowledged by prosody and received by 5 clients:")
    for size in (100, 10):
        kept, per_batch = rates[size, True], rates[size, False]
        print(
            f"  batches of {size:>3}: warm session {kept:7.0f} msg/s, "
            f"login per batch {per_batch:7.0f} msg/s, warm/per-batch {kept / per_batch:5.1f}x"
        )


if __name__ == "__main__":
    main()
