"""Delivery counters of the worker processes, for the Prometheus endpoint."""


def count_outcome(alias: str, status: str) -> None:
    """Counts one stored outcome ("sent", "failed" or "retried") of a messenger's dispatch."""


def observe_send(alias: str, seconds: float) -> None:
    """Records the seconds a messenger spent sending one dispatch."""
