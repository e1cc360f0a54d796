"""Worker process lifecycle with real `celery worker` processes: each process warms the
messengers of the queues it consumes once, reuses them for every batch, and cools them once
when it stops."""

from collections import Counter

import pytest

from dispatcher.models import Dispatch
from sitemessage.toolbox import recipients, schedule_messages
from tests.support import free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def events(log_path):
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    return [tuple(line.split(" ", 1)) for line in lines]


def deliver_batches(count: int) -> None:
    schedule_messages("ping", recipients("recorder", [f"r{i}" for i in range(count)]))
    # 50 no-op batches take well under a second; the bound is loose for a busy box but catches a
    # worker that idles between batches (a solo worker under kombu's event loop stalled 10 s at a
    # time on RabbitMQ and needed 20-70 s).
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == count,
        timeout=15,
    )


@pytest.mark.parametrize("pool, processes", [("prefork", 2), ("solo", 1)])
def test_before_send_once_per_process_for_many_batches_and_after_send_at_shutdown(
    start_worker, tmp_path, settings, pool, processes
):
    settings.SITEMESSAGE_BATCH_SIZE = 1  # 50 dispatches -> 50 batches
    log = tmp_path / "recorder.log"
    # In the worker too, so that a task claims no more than its one id (claim_waiting).
    env = {"RECORDER_LOG": str(log), "SITEMESSAGE_BATCH_SIZE": "1"}
    worker = start_worker(["messenger.recorder"], concurrency=2, pool=pool, env=env)

    deliver_batches(50)
    assert worker.stop() == 0

    seen = events(log)
    warmed = Counter(pid for pid, event in seen if event == "before_send")
    cooled = Counter(pid for pid, event in seen if event == "after_send")
    batches = Counter(pid for pid, event in seen if event.startswith("send "))
    print(
        f"\n{pool}: before_send {dict(warmed)}, batches {dict(batches)}, after_send {dict(cooled)}"
    )
    assert len(warmed) == processes and set(warmed.values()) == {1}
    assert sum(batches.values()) == 50 and set(batches) <= set(warmed)
    assert cooled == warmed
    if pool == "prefork":
        assert str(worker.proc.pid) not in warmed  # the children work, not the parent
    for pid in warmed:  # in each process: warm, batches, cool, in that order
        mine = [event for p, event in seen if p == pid]
        assert mine[0] == "before_send" and mine[-1] == "after_send"


def test_a_worker_warms_only_the_messengers_of_its_queues(start_worker, tmp_path):
    log = tmp_path / "recorder.log"
    worker = start_worker(
        ["messenger.smtp"],
        concurrency=1,
        # Nothing listens there, so the smtp warm-up leaves a line in the log when it has run.
        env={"RECORDER_LOG": str(log), "EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(free_port())},
    )
    assert wait_until(lambda: "messenger smtp did not warm up" in worker.text(), timeout=15)
    assert worker.stop() == 0
    assert events(log) == []


def test_a_worker_starts_with_its_server_down_and_delivers_once_it_is_back(
    start_worker, smtp_servers
):
    server = smtp_servers(start=False)  # nothing listens on its port yet
    port = server.port
    worker = start_worker(
        ["messenger.smtp"], env={"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)}
    )
    # Prefork children warm up on their own after the parent printed "ready.".
    assert wait_until(lambda: "did not warm up" in worker.text(), timeout=15)
    assert f"cannot connect to SMTP server 127.0.0.1:{port}" in worker.text()
    sink = server.start().sink
    addresses = [f"late{i}@example.com" for i in range(10)]
    schedule_messages("back again", recipients("smtp", addresses))
    sink.wait_for(10, timeout=30)
    assert sorted(sink.recipients()) == sorted(addresses)
    assert wait_until(
        lambda: Dispatch.objects.filter(dispatch_status=Dispatch.Status.SENT).count() == 10, 10
    )
    assert set(Dispatch.objects.values_list("retry_count", flat=True)) == {1}
