"""Queue and task names: one queue per messenger, so each channel gets the workers it needs."""

#: Everything that is not a delivery: schedule_messages.delay() and the sweep.
DEFAULT_QUEUE = "sitemessage"
MESSENGER_QUEUE_PREFIX = "messenger."

#: Task names, published by name (``workers.broker``) and registered by ``dispatcher.tasks``.
SEND_DISPATCHES = "dispatcher.send_dispatches"
SCHEDULE_MESSAGES = "dispatcher.schedule_messages"
SWEEP = "dispatcher.sweep"


def queue_for(alias: str) -> str:
    return f"{MESSENGER_QUEUE_PREFIX}{alias}"


def alias_of_queue(queue: str) -> str | None:
    return (
        queue.removeprefix(MESSENGER_QUEUE_PREFIX)
        if queue.startswith(MESSENGER_QUEUE_PREFIX)
        else None
    )
