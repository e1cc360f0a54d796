"""Celery settings of sitemessage (https://docs.celeryq.dev/en/stable/userguide/configuration.html).

Timing invariant, largest first: broker visibility timeout (3600 s) > task hard time limit
(300 s) > soft limit (240 s) > every network timeout inside a task (SMTP/HTTP/XMPP timeouts,
10-30 s): the broker never redelivers a task that is still running. The dispatch lease
(SITEMESSAGE_LEASE_SECONDS, 30 s) is renewed by the running task every third of it, so it
outlives no process: a killed worker's dispatches are free within one lease, and the task
redelivered with the same id takes them back at once (dispatcher/pipeline.py).
"""

import os

from dispatcher import conf
from workers.queues import CLEANUP, CLEANUP_INTERVAL, DEFAULT_QUEUE, SWEEP

# Redis by default; RabbitMQ works as well (amqp://guest:guest@127.0.0.1:5672//).
broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
# Keep retrying the broker at start instead of exiting (Celery 6 changes the default).
broker_connection_retry_on_startup = True
# Redis only: seconds before an unacknowledged task is given to another worker. Must exceed the
# hard time limit, or a task still running is delivered twice.
broker_transport_options = {"visibility_timeout": 3600}

# JSON only: pickle would let anyone who can write to the broker run code in the workers.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# Acknowledge after the task ran, so a worker that dies mid-batch does not lose it...
task_acks_late = True
# ...and requeue it when the worker process was killed (SIGKILL, OOM).
task_reject_on_worker_lost = True
# One task at a time per process: late acks with prefetch would hold batches hostage.
worker_prefetch_multiplier = 1
# A task may run for 5 minutes; the soft limit lets it persist what it did first.
task_time_limit = 300
task_soft_time_limit = 240
# Delivery outcomes live in the database; no result backend is needed.
task_ignore_result = True
# schedule_messages.delay() and the sweep; delivery tasks go to messenger.<alias> queues.
task_default_queue = DEFAULT_QUEUE
# Task modules to import in workers and beat.
imports = ("dispatcher.tasks",)
# Ship task events to Flower without `celery control enable_events`.
worker_send_task_events = True
task_send_sent_event = True

# Beat: one sweep for due retries, lost publishes and expired leases (idempotent).
beat_schedule = {
    "sitemessage-sweep": {
        "task": SWEEP,
        "schedule": conf.SWEEP_INTERVAL.get(),  # a Django setting, read when this loads
        "options": {"queue": DEFAULT_QUEUE, "expires": 60},
    },
}
# Housekeeping, off unless SITEMESSAGE_CLEANUP_AFTER_DAYS is set: deletes old sent dispatches
# in chunks, for a bounded time per run (dispatcher.tasks.cleanup).
if conf.CLEANUP_AFTER_DAYS.get() is not None:
    beat_schedule["sitemessage-cleanup"] = {
        "task": CLEANUP,
        "schedule": CLEANUP_INTERVAL,
        "options": {"queue": DEFAULT_QUEUE, "expires": CLEANUP_INTERVAL},
    }
