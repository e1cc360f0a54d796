"""Delivery counters of the worker processes, for the Prometheus endpoint (dispatcher.monitoring).

The workers count and the web process serves /metrics: different processes, and a prefork
worker is several itself. So the counters use prometheus_client's multiprocess mode: every
process writes its values to files of its own (``counter_<pid>.db``) in a directory, and a
scrape adds up the files (WorkerCounters).

The directory is SITEMESSAGE_METRICS_DIR, by default VAR_DIR/metrics of the Django settings
(this service: ``$SITEMESSAGE_VAR_DIR/metrics``), the same for the web process and the workers of
one host. Each worker (one ``celery worker`` command, its pool children included) writes to a
subdirectory named after its node (``celery@host``) and empties it when it starts
(start_worker): a restarted worker's counters start again from 0, which Prometheus takes as a
counter reset (its series carry a ``worker`` label for that), and several workers on one host
never erase each other's files.

prometheus_client decides between values in memory and values in files when it is first
imported, from PROMETHEUS_MULTIPROC_DIR. start_worker sets that variable in the worker's main
process at ``worker_init``, before the pool forks (the children inherit it) and before anything
here imports prometheus_client. A process without the variable (the web, ``manage.py``, a
test) counts nothing: count_outcome() and observe_send() do nothing there.

Labels are messenger aliases and outcome names only, never addresses.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from django.conf import settings

from . import conf

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

#: What count_outcome() counts: a dispatch sent, failed for good, or given back for a retry.
OUTCOMES = ("sent", "failed", "retried")
#: Upper bounds (seconds) of the send-latency buckets: a warm SMTP connection takes
#: milliseconds per e-mail, an HTTP API a few hundred, a provider in trouble its timeout.
SEND_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: The environment variable that switches prometheus_client to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Collectors(NamedTuple):
    outcomes: Counter
    send_seconds: Histogram


def metrics_dir() -> Path | None:
    """The directory of this host's worker counters; None when none is configured."""
    configured = conf.METRICS_DIR.get()
    if configured is not None:
        return Path(configured)
    var_dir = getattr(settings, "VAR_DIR", None)
    return None if var_dir is None else Path(var_dir) / "metrics"


def worker_dir(root: Path, node: str) -> Path:
    """The subdirectory of one worker node (``celery@host``) under the metrics directory."""
    return root / re.sub(r"[^A-Za-z0-9@._-]", "_", node)


def start_worker(node: str, aliases: Iterable[str]) -> Path | None:
    """Prepares this worker's counters, in its main process before the pool starts: empties
    its directory, points PROMETHEUS_MULTIPROC_DIR at it, and creates the counters of the
    messengers it serves at 0 (so a rate over the first failure sees it). Returns the
    directory; None (and nothing is counted) when no metrics directory is configured."""
    root = metrics_dir()
    if root is None:
        logger.info("no SITEMESSAGE_METRICS_DIR (nor VAR_DIR): delivery counters are off")
        return None
    directory = worker_dir(root, node)
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)  # the web may run in a group
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    if "prometheus_client.values" in sys.modules:
        # Something imported prometheus_client before the variable was set: its choice of
        # in-memory values would keep every count of this worker out of the files.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    _collectors.cache_clear()  # in case anything counted before the variable was set
    collectors = _collectors()
    if collectors is not None:
        for alias in aliases:
            for outcome in OUTCOMES:
                collectors.outcomes.labels(alias, outcome)
            collectors.send_seconds.labels(alias)
    return directory


def process_exited(pid: int) -> None:
    """Called as a pool process exits: removes its live-gauge files (prometheus_client's
    bookkeeping; its counter files stay, since what it counted still counts)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def count_outcome(alias: str, status: str) -> None:
    """Counts one stored outcome ("sent", "failed" or "retried") of a messenger's dispatch."""
    if status not in OUTCOMES:
        raise ValueError(f"unknown outcome {status!r}, expected one of {', '.join(OUTCOMES)}")
    collectors = _collectors()
    if collectors is not None:
        collectors.outcomes.labels(alias, status).inc()


def observe_send(alias: str, seconds: float) -> None:
    """Records the seconds a messenger spent sending one dispatch."""
    collectors = _collectors()
    if collectors is not None:
        collectors.send_seconds.labels(alias).observe(seconds)


@functools.cache
def _collectors() -> Collectors | None:
    """The counters of this process (created once, inherited by forked children, which then
    write files of their own); None outside a worker with a metrics directory. They are not
    registered anywhere: the web process reads them from the files."""
    if not os.environ.get(MULTIPROC_ENV):
        return None
    from prometheus_client import Counter, Histogram

    return Collectors(
        Counter(
            "sitemessage_outcomes",
            "Dispatch outcomes the workers stored: sent, failed (for good), retried (to retry)",
            ["messenger", "outcome"],
            registry=None,
        ),
        Histogram(
            "sitemessage_send_seconds",
            "Seconds a messenger spent sending one dispatch",
            ["messenger"],
            buckets=SEND_SECONDS_BUCKETS,
            registry=None,
        ),
    )


class WorkerCounters:
    """A prometheus_client collector: the counters in the files of every worker under ``root``,
    each worker's processes added up (as MultiProcessCollector does for one directory) and
    labelled ``worker`` with its node. One series per worker, because a worker's restart
    empties its files: Prometheus takes that drop as the reset of that worker's series alone,
    where a sum over the host's workers would just fall, and rate() would misread it."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def collect(self) -> Iterator[Metric]:
        if self.root is None or not self.root.is_dir():
            return iter(())
        from prometheus_client.metrics_core import Metric
        from prometheus_client.multiprocess import MultiProcessCollector

        families: dict[str, Metric] = {}
        for directory in sorted(path for path in self.root.iterdir() if path.is_dir()):
            files = sorted(str(path) for path in directory.glob("*.db"))
            for family in MultiProcessCollector.merge(files, accumulate=True):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                merged.samples += [
                    sample._replace(labels={**sample.labels, "worker": directory.name})
                    for sample in family.samples
                ]
        return iter(families.values())
