"""The delivery dashboard's figures, read in four grouped queries, and its chart, drawn here as
SVG so the admin page needs no JavaScript and nothing from a CDN.

Per messenger: its dispatches by status, how long its oldest due pending dispatch has waited,
and what it sent and failed in each minute of the last hour. A sent dispatch counts in the
minute of its ``sent_at``; a failed one in the minute of its final error entry (the one whose
attempt is the dispatch's last: the pipeline, the sweep and the "Cancel" action all write it).
Minutes are truncated by the database (TruncMinute, in UTC), the same on SQLite and PostgreSQL.
The workers serving each queue come from the broker (workers.broker.workers_by_queue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import Count, F, Min
from django.db.models.functions import Coalesce, TruncMinute
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from messengers.registry import get_registered_messenger_objects
from workers.broker import workers_by_queue
from workers.queues import DEFAULT_QUEUE, queue_for

from . import conf
from .models import Dispatch, DispatchError

Status = Dispatch.Status
#: Minutes the chart covers, the current one included.
WINDOW_MINUTES = 60
#: Seconds the page waits for workers to say which queues they consume.
WORKERS_TIMEOUT = 1.0


@dataclass
class MessengerFigures:
    """One messenger's row and chart on the dashboard."""

    alias: str
    #: Dispatches per status, every status present (0 when there is none).
    counts: dict[int, int] = field(default_factory=lambda: dict.fromkeys(Status.values, 0))
    #: How long the oldest due PENDING dispatch has waited; None when none waits.
    oldest_pending: timedelta | None = None
    #: Dispatches sent and failed in each minute of the window, oldest minute first.
    sent: list[int] = field(default_factory=lambda: [0] * WINDOW_MINUTES)
    failed: list[int] = field(default_factory=lambda: [0] * WINDOW_MINUTES)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Figures:
    """Everything the dashboard shows from the database, as of ``now``."""

    now: datetime
    #: The start of each minute of the window (UTC), oldest first.
    minutes: list[datetime]
    messengers: list[MessengerFigures]


def delivery_figures(now: datetime | None = None) -> Figures:
    """Reads the dashboard's figures: one query per kind (counts, oldest pending, sent per
    minute, failed per minute), each grouped by messenger, whatever the number of messengers
    and rows. Messengers registered but without dispatches are listed with zeros."""
    now = now or timezone.now()
    first = now.astimezone(UTC).replace(second=0, microsecond=0) - timedelta(
        minutes=WINDOW_MINUTES - 1
    )
    minutes = [first + timedelta(minutes=n) for n in range(WINDOW_MINUTES)]
    end = first + timedelta(minutes=WINDOW_MINUTES)
    by_alias: dict[str, MessengerFigures] = {}

    def figures(alias: str) -> MessengerFigures:
        return by_alias.setdefault(alias, MessengerFigures(alias))

    for alias in get_registered_messenger_objects():
        figures(alias)
    for row in Dispatch.objects.values("messenger", "dispatch_status").annotate(n=Count("pk")):
        figures(row["messenger"]).counts[row["dispatch_status"]] = row["n"]
    waiting = (
        Dispatch.objects.filter(dispatch_status=Status.PENDING)
        .exclude(send_at__gt=now)  # later delivery: not late before its moment
        .values("messenger")
        .annotate(since=Min(Coalesce("send_at", "time_created")))
    )
    for row in waiting:
        figures(row["messenger"]).oldest_pending = max(now - row["since"], timedelta(0))
    index = {minute: n for n, minute in enumerate(minutes)}
    sent = (
        Dispatch.objects.filter(sent_at__gte=first, sent_at__lt=end)
        .annotate(minute=TruncMinute("sent_at", tzinfo=UTC))
        .values("messenger", "minute")
        .annotate(n=Count("pk"))
    )
    for row in sent:
        figures(row["messenger"]).sent[index[row["minute"]]] = row["n"]
    failed = (
        DispatchError.objects.filter(
            time_created__gte=first,
            time_created__lt=end,
            dispatch__dispatch_status=Status.FAILED,
            attempt=F("dispatch__retry_count"),
        )
        .annotate(minute=TruncMinute("time_created", tzinfo=UTC))
        .values("dispatch__messenger", "minute")
        .annotate(n=Count("dispatch", distinct=True))
        .order_by()  # DispatchError's Meta.ordering would split the groups
    )
    for row in failed:
        figures(row["dispatch__messenger"]).failed[index[row["minute"]]] = row["n"]
    return Figures(now, minutes, [by_alias[alias] for alias in sorted(by_alias)])


@dataclass
class QueueWorkers:
    """A queue and the worker nodes that said they consume it."""

    queue: str
    workers: list[str]


def queue_workers(
    aliases: list[str], timeout: float = WORKERS_TIMEOUT
) -> list[QueueWorkers] | None:
    """The queues this deployment needs (the default one, and each messenger's lanes) and any
    other queue a worker consumes, each with its workers (none: nobody serves it); None when
    the broker is unreachable."""
    serving = workers_by_queue(timeout=timeout)
    if serving is None:
        return None
    lanes = [False, True] if conf.URGENT_PRIORITY.get() is not None else [False]
    needed = [DEFAULT_QUEUE, *(queue_for(alias, urgent) for alias in aliases for urgent in lanes)]
    queues = needed + sorted(set(serving) - set(needed))
    return [QueueWorkers(queue, serving.get(queue, [])) for queue in queues]


# The chart: two bars per minute, sent and failed, on one scale.

CHART_WIDTH, CHART_HEIGHT = 720, 180
#: Room for the axis labels: left of the bars, below them, and for the last one, right.
LEFT, BOTTOM, TOP, RIGHT = 40, 20, 10, 16
COLORS = {"sent": "#417690", "failed": "#ba2121"}  # the admin's own blue and error red


def chart_svg(minutes: list[datetime], sent: list[int], failed: list[int]) -> SafeString:
    """An SVG bar chart of sent and failed dispatches per minute. Every minute has both bars
    (height 0 when nothing happened), each with ``data-minute`` (ISO, UTC), ``data-count`` and
    a tooltip, so a reader and a test get the exact figures behind the picture."""
    peak = max([*sent, *failed, 1])
    plot_height = CHART_HEIGHT - BOTTOM - TOP
    slot = (CHART_WIDTH - LEFT - RIGHT) / len(minutes)
    bar = max(slot / 2 - 1, 1)

    def bars(kind: str, counts: list[int], offset: float) -> SafeString:
        rows = []
        for n, (minute, count) in enumerate(zip(minutes, counts, strict=True)):
            height = round(plot_height * count / peak, 1)
            rows.append(
                (
                    kind,
                    round(LEFT + n * slot + offset, 1),
                    round(TOP + plot_height - height, 1),
                    round(bar, 1),
                    height,
                    COLORS[kind],
                    minute.isoformat().replace("+00:00", "Z"),
                    count,
                    timezone.localtime(minute).strftime("%H:%M"),
                    count,
                    kind,
                )
            )
        return format_html_join(
            "",
            '<rect class="bar {}" x="{}" y="{}" width="{}" height="{}" fill="{}" '
            'data-minute="{}" data-count="{}"><title>{}: {} {}</title></rect>',
            rows,
        )

    ticks = format_html_join(
        "",
        '<text x="{}" y="{}" text-anchor="middle">{}</text>',
        (
            (
                round(LEFT + n * slot + slot / 2, 1),
                CHART_HEIGHT - 5,
                timezone.localtime(minute).strftime("%H:%M"),
            )
            for n, minute in enumerate(minutes)
            if n % 10 == 0 or n == len(minutes) - 1
        ),
    )
    return format_html(
        '<svg class="sitemessage-chart" xmlns="http://www.w3.org/2000/svg" role="img" '
        'viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-size="10" fill="currentColor">'
        "<title>{total_sent} sent and {total_failed} failed in the last {window} minutes</title>"
        '<text class="peak" x="{label_x}" y="{peak_y}" text-anchor="end">{peak}</text>'
        '<text x="{label_x}" y="{zero_y}" text-anchor="end">0</text>'
        '<line x1="{left}" y1="{zero_y}" x2="{right}" y2="{zero_y}" stroke="#999"/>'
        "{sent}{failed}{ticks}</svg>",
        w=CHART_WIDTH,
        h=CHART_HEIGHT,
        total_sent=sum(sent),
        total_failed=sum(failed),
        window=len(minutes),
        label_x=LEFT - 4,
        peak_y=TOP + 8,
        peak=peak,
        zero_y=TOP + plot_height,
        left=LEFT,
        right=CHART_WIDTH - RIGHT,
        sent=bars("sent", sent, 0),
        failed=bars("failed", failed, bar),
        ticks=ticks,
    )
