"""Queue and task names: one queue per messenger, so each channel gets the workers it needs."""

#: Everything that is not a delivery: schedule_messages.delay(), the sweep and the cleanup.
DEFAULT_QUEUE = "sitemessage"
MESSENGER_QUEUE_PREFIX = "messenger."

#: Task names, published by name (``workers.broker``) and registered by ``dispatcher.tasks``.
SEND_DISPATCHES = "dispatcher.send_dispatches"
SCHEDULE_MESSAGES = "dispatcher.schedule_messages"
SWEEP = "dispatcher.sweep"
CLEANUP = "dispatcher.cleanup"

#: Seconds between two cleanups by beat (when SITEMESSAGE_CLEANUP_AFTER_DAYS is set): hourly,
#: so each run deletes about an hour's worth of sent rows rather than a day's in one go.
CLEANUP_INTERVAL = 3600


#: Suffix of a messenger's urgent lane (``messenger.<alias>.urgent``): dispatches of messages
#: with a priority of at least SITEMESSAGE_URGENT_PRIORITY, so they never queue behind bulk.
URGENT_SUFFIX = ".urgent"


def queue_for(alias: str, urgent: bool = False) -> str:
    """The queue of a messenger's normal lane, or of its urgent lane."""
    return f"{MESSENGER_QUEUE_PREFIX}{alias}{URGENT_SUFFIX if urgent else ''}"


def alias_of_queue(queue: str) -> str | None:
    """The messenger alias a queue (either lane) delivers for; None for any other queue."""
    if not queue.startswith(MESSENGER_QUEUE_PREFIX):
        return None
    return queue.removeprefix(MESSENGER_QUEUE_PREFIX).removesuffix(URGENT_SUFFIX)
