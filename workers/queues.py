"""Queue naming: one queue per messenger, so each channel gets the workers it needs."""

#: Everything that is not a delivery: schedule_messages.delay() and the sweep.
DEFAULT_QUEUE = "sitemessage"
MESSENGER_QUEUE_PREFIX = "messenger."


def queue_for(alias: str) -> str:
    return f"{MESSENGER_QUEUE_PREFIX}{alias}"


def alias_of_queue(queue: str) -> str | None:
    return (
        queue.removeprefix(MESSENGER_QUEUE_PREFIX)
        if queue.startswith(MESSENGER_QUEUE_PREFIX)
        else None
    )
