"""The Prometheus endpoint (``/metrics``): gauges computed from the database at each scrape, and
the delivery counters of this host's workers (dispatcher.metrics).

Only staff (an admin session, as for the admin) or a scraper that sends
``Authorization: Bearer <SITEMESSAGE_METRICS_TOKEN>`` read it: 401 without credentials or with
a wrong token, 403 for a signed-in user who is not staff. Labels are messenger aliases and
status names only, never addresses.

Attach it with ``path("metrics", dispatcher.monitoring.metrics)`` (this service does, in
config/urls.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from django.db.models import Count, Min, Q
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.utils import timezone
from django.views.decorators.cache import never_cache
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from messengers.registry import get_registered_messenger_objects

from . import conf
from .metrics import WorkerCounters, metrics_dir
from .models import Dispatch

Status = Dispatch.Status
#: The status label of each dispatch status: its name, lower case.
STATUS_LABELS = {status.value: status.name.lower() for status in Status}


class DatabaseCollector:
    """A prometheus_client collector: the dispatches by messenger and status, the age of each
    messenger's oldest due pending dispatch, and the leases past their expiry (PROCESSING rows
    whose worker died and that no sweep has given back yet), read at each scrape. Every
    registered messenger has its series, at 0 when it has no rows."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        aliases = set(get_registered_messenger_objects())
        rows = Dispatch.objects.order_by()
        counts = {
            (alias, status): n
            for alias, status, n in rows.values_list("messenger", "dispatch_status").annotate(
                n=Count("pk")
            )
        }
        due = Q(send_at__isnull=True) | Q(send_at__lte=now)
        oldest = dict(
            rows.filter(due, dispatch_status=Status.PENDING)
            .values_list("messenger")
            .annotate(since=Min(Coalesce("send_at", "time_created")))
        )
        expired = dict(
            rows.filter(dispatch_status=Status.PROCESSING, lease_expires_at__lt=now)
            .values_list("messenger")
            .annotate(n=Count("pk"))
        )
        aliases.update(alias for alias, _ in counts)
        yield self._dispatches(sorted(aliases), counts)
        pending = GaugeMetricFamily(
            "sitemessage_oldest_pending_seconds",
            "Age of the messenger's oldest due PENDING dispatch (0: none waits)",
            labels=["messenger"],
        )
        leases = GaugeMetricFamily(
            "sitemessage_expired_leases",
            "PROCESSING dispatches whose lease expired (their worker died; the sweep gives "
            "them back)",
            labels=["messenger"],
        )
        for alias in sorted(aliases):
            since = oldest.get(alias)
            pending.add_metric([alias], 0 if since is None else (now - since).total_seconds())
            leases.add_metric([alias], expired.get(alias, 0))
        yield pending
        yield leases

    def _dispatches(self, aliases: list[str], counts: dict[tuple[str, int], int]) -> Metric:
        family = GaugeMetricFamily(
            "sitemessage_dispatches",
            "Dispatches in the database, by messenger and status",
            labels=["messenger", "status"],
        )
        for alias in aliases:
            for status, label in STATUS_LABELS.items():
                family.add_metric([alias, label], counts.get((alias, status), 0))
        return family


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """The metrics in Prometheus' text format (or OpenMetrics, when the scraper asks)."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET"])
    refused = refusal(request)
    if refused is not None:
        return refused
    registry = CollectorRegistry()
    registry.register(DatabaseCollector())
    registry.register(WorkerCounters(metrics_dir()))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(registry), content_type=content_type)


def refusal(request: HttpRequest) -> HttpResponse | None:
    """None when the request may read the metrics: a staff session, or the bearer token."""
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return None
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    token = conf.METRICS_TOKEN.get()
    if scheme.lower() == "bearer" and credentials:
        if token is not None and hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return None
        return _unauthorized("invalid_token")
    if user is not None and user.is_authenticated:
        return HttpResponse("Staff only.\n", status=403, content_type="text/plain")
    return _unauthorized()


def _unauthorized(error: str | None = None) -> HttpResponse:
    response = HttpResponse(
        "Sign in as staff, or send Authorization: Bearer <SITEMESSAGE_METRICS_TOKEN>.\n",
        status=401,
        content_type="text/plain",
    )
    challenge = 'Bearer realm="sitemessage metrics"'
    response["WWW-Authenticate"] = challenge + (f', error="{error}"' if error else "")
    return response
