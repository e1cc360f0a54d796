"""The admin: messages with their dispatches (counted per status in the list, a page at a time
on the message's page), dispatches with their error log and their Celery task (linked to
Flower when SITEMESSAGE_FLOWER_URL is set), the "Retry now" and "Cancel" actions, and the
delivery dashboard (``admin/sitemessage/dispatch/dashboard/``; figures: dispatcher.dashboard).

Everything here is delivery bookkeeping, so every form is view-only and nothing can be added by
hand: scheduling validates addresses and contexts, a form would not. A dispatch's status changes
only through the two actions, which take the rows they change under a lock and skip rows a
worker holds. Deleting (which loses the history) is left to superusers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.options import BaseModelAdmin
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Page, Paginator
from django.db import transaction
from django.db.models import Count, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from messengers.base import Outcome
from messengers.registry import get_registered_messenger_objects

from . import conf, dashboard
from .models import Dispatch, DispatchError, Message, ScheduleRequest
from .pipeline import apply_outcome
from .toolbox import publish_dispatches

Status = Dispatch.Status
#: Dispatches per page of a message's inline list; the query parameter that turns its pages.
INLINE_DISPATCHES = 100
PAGE_PARAM = "dispatches_page"
#: The message list's count columns: the attribute MessageChangeList sets -> its status.
STATUS_COLUMNS = {
    "n_pending": Status.PENDING,
    "n_processing": Status.PROCESSING,
    "n_sent": Status.SENT,
    "n_error": Status.ERROR,
    "n_failed": Status.FAILED,
}
#: The error text of a cancelled dispatch.
CANCELLED = "cancelled"


class ViewOnly(BaseModelAdmin):
    """Mixin for a model admin or inline that shows rows and never saves or adds one."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Asked without an object, the answer gates the changelist actions, which need it;
        # asked for one object, it decides the change form, which must stay view-only.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        user: Any = request.user
        return bool(user.is_superuser) and super().has_delete_permission(request, obj)


class DispatchPage(BaseInlineFormSet):
    """One page of INLINE_DISPATCHES dispatches of a message, in order of creation, so a
    message sent to 100,000 recipients opens as fast as one sent to a hundred. The page comes
    from the PAGE_PARAM query parameter (MessageAdmin.get_formset_kwargs); a page number out
    of range shows the last page."""

    def __init__(self, *args: Any, page_number: str | int | None = 1, **kwargs: Any) -> None:
        self.page_number = page_number
        super().__init__(*args, **kwargs)

    def get_queryset(self) -> QuerySet[Any]:
        if not hasattr(self, "_queryset"):
            self._queryset = cast(QuerySet[Any], self.page.object_list)
        return self._queryset

    @property
    def page(self) -> Page:
        if not hasattr(self, "_page"):
            everything = Dispatch.objects.filter(message=self.instance).order_by("pk")
            self._page = Paginator(everything, INLINE_DISPATCHES).get_page(self.page_number)
        return self._page

    def page_links(self) -> list[int | str]:
        """The page numbers to link to, with Paginator.ELLIPSIS for the gaps."""
        return list(self.page.paginator.get_elided_page_range(self.page.number))


class DispatchInline(ViewOnly, admin.TabularInline):
    model = Dispatch
    formset = DispatchPage
    template = "admin/sitemessage/dispatch_inline.html"
    fields = ("messenger", "address", "dispatch_status", "retry_count", "sent_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


class MessageChangeList(ChangeList):
    """The message list, each message with its dispatches counted per status: one grouped
    query for the messages of the page, run after the page is read. (Aggregates annotated on
    the list's queryset would also go into the list's count, which Django cannot strip of a
    join, so each page would count every dispatch of the table.)"""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        page = list(self.result_list)
        counts: dict[int, dict[int, int]] = {m.pk: {} for m in page}
        grouped = (
            Dispatch.objects.filter(message__in=[m.pk for m in page])
            .values_list("message_id", "dispatch_status")
            .annotate(n=Count("pk"))
        )
        for message_id, status, n in grouped:
            counts[message_id][status] = n
        for message in page:
            for name, status in STATUS_COLUMNS.items():
                setattr(message, name, counts[message.pk].get(status, 0))
        self.result_list = page


def dispatches_link(message: Message, count: int, status: int) -> str:
    """A count of the message list, linked to the message's dispatches of that status."""
    if not count:
        return "0"
    query = urlencode({"message__id__exact": message.pk, "dispatch_status__exact": status})
    url = reverse("admin:sitemessage_dispatch_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, query, count)


@admin.register(Message)
class MessageAdmin(ViewOnly, admin.ModelAdmin):
    list_display = (
        "pk",
        "cls",
        "sender",
        "priority",
        "time_created",
        *STATUS_COLUMNS,
    )
    list_filter = ("cls", "priority")
    list_select_related = ("sender",)
    readonly_fields = ("all_dispatches",)
    inlines = [DispatchInline]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return MessageChangeList

    def get_formset_kwargs(
        self, request: HttpRequest, obj: Any, inline: Any, prefix: str
    ) -> dict[str, Any]:
        formset_kwargs = super().get_formset_kwargs(request, obj, inline, prefix)
        if isinstance(inline, DispatchInline):
            formset_kwargs["page_number"] = request.GET.get(PAGE_PARAM, 1)
        return formset_kwargs

    @admin.display(description="dispatches")
    def all_dispatches(self, obj: Message) -> str:
        url = reverse("admin:sitemessage_dispatch_changelist")
        count = obj.dispatches.count()  # type: ignore[attr-defined]
        return format_html('<a href="{}?message__id__exact={}">all {}</a>', url, obj.pk, count)

    # The count columns (MessageChangeList counts them).

    @admin.display(description="pending")
    def n_pending(self, obj: Any) -> str:
        return dispatches_link(obj, obj.n_pending, Status.PENDING)

    @admin.display(description="processing")
    def n_processing(self, obj: Any) -> str:
        return dispatches_link(obj, obj.n_processing, Status.PROCESSING)

    @admin.display(description="sent")
    def n_sent(self, obj: Any) -> str:
        return dispatches_link(obj, obj.n_sent, Status.SENT)

    @admin.display(description="will retry")
    def n_error(self, obj: Any) -> str:
        return dispatches_link(obj, obj.n_error, Status.ERROR)

    @admin.display(description="failed")
    def n_failed(self, obj: Any) -> str:
        return dispatches_link(obj, obj.n_failed, Status.FAILED)


class DispatchErrorInline(ViewOnly, admin.TabularInline):
    model = DispatchError
    readonly_fields = ("attempt", "exc_type", "error_log", "time_created")
    extra = 0
    can_delete = False


class MessengerFilter(admin.SimpleListFilter):
    """By messenger, offering the registered ones: listing the aliases found in the table
    would read all of its rows on every page."""

    title = "messenger"
    parameter_name = "messenger"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(alias, alias) for alias in sorted(get_registered_messenger_objects())]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(messenger=value) if value else queryset


class PriorityFilter(admin.SimpleListFilter):
    """By the priority of the dispatch's message, offering those the messages have (read from
    the indexed message column, not through every dispatch)."""

    title = "message priority"
    parameter_name = "priority"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        priorities = Message.objects.order_by("priority").values_list("priority", flat=True)
        return [(str(p), str(p)) for p in priorities.distinct()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value is None:
            return queryset
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(message__priority=int(value))


@admin.register(Dispatch)
class DispatchAdmin(ViewOnly, admin.ModelAdmin):
    list_display = (
        "pk",
        "messenger",
        "address",
        "dispatch_status",
        "retry_count",
        "next_attempt_at",
        "sent_at",
        "task",
    )
    list_filter = (
        "dispatch_status",
        MessengerFilter,
        PriorityFilter,
        ("time_created", admin.DateFieldListFilter),
        ("sent_at", admin.DateFieldListFilter),
    )
    search_fields = ("address", "provider_message_id")
    exclude = ("task_id",)
    readonly_fields = ("task",)
    inlines = [DispatchErrorInline]
    actions = ["retry_now", "cancel"]

    @admin.display(description="task id", ordering="task_id")
    def task(self, obj: Dispatch) -> str:
        """The id of the Celery task that handled the dispatch last, linked to its page in
        Flower when SITEMESSAGE_FLOWER_URL is set."""
        flower = conf.FLOWER_URL.get()
        if not obj.task_id or not flower:
            return obj.task_id or "-"
        return format_html(
            '<a href="{}/task/{}">{}</a>', flower.rstrip("/"), obj.task_id, obj.task_id
        )

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.dashboard_view)
        # Before the model's own URLs, whose "<object_id>/" would take "dashboard/".
        return [path("dashboard/", view, name="sitemessage_dashboard"), *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """The delivery dashboard: for staff who may view dispatches (it shows no addresses)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        figures = dashboard.delivery_figures()
        rows = [dashboard_row(m, figures.minutes) for m in figures.messengers]
        queues = dashboard.queue_workers([m.alias for m in figures.messengers])
        context = {
            **self.admin_site.each_context(request),
            "title": "Delivery dashboard",
            "opts": self.opts,
            "now": figures.now,
            "window": dashboard.WINDOW_MINUTES,
            "statuses": Status.labels,
            "rows": rows,
            "queues": queues,
            "answered": queues is not None and any(entry.workers for entry in queues),
            "timeout": dashboard.WORKERS_TIMEOUT,
        }
        return TemplateResponse(request, "admin/sitemessage/dashboard.html", context)

    @admin.action(description="Retry now", permissions=["change"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Dispatch]) -> None:
        """Gives the selected FAILED and ERROR dispatches a fresh attempt budget and publishes
        them at once; delivery claims them like any other pending dispatch."""
        with transaction.atomic():
            rows = list(
                queryset.filter(dispatch_status__in=[Status.FAILED, Status.ERROR])
                .select_for_update()
                .values_list("pk", "messenger", "message__priority")
            )
            Dispatch.objects.filter(pk__in=[pk for pk, _, _ in rows]).update(
                dispatch_status=Status.PENDING,
                retry_count=0,
                next_attempt_at=timezone.now(),
                lease_owner="",
                lease_expires_at=None,
            )
            log_actions(request, [pk for pk, _, _ in rows], "Retry now")
        skipped = queryset.count() - len(rows)
        note = (
            f"; {skipped} skipped (only failed or error dispatches are retried)" if skipped else ""
        )
        unpublished = publish_dispatches(rows)
        if unpublished:
            self.message_user(
                request,
                f"{len(rows)} dispatches reset to pending, but publishing failed for "
                f"{len(unpublished)} of them (see the log); the next sweep publishes them{note}",
                messages.ERROR,
            )
        else:
            self.message_user(
                request, f"{len(rows)} dispatches queued for retry now{note}", messages.SUCCESS
            )

    @admin.action(description="Cancel", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Dispatch]) -> None:
        """Fails the selected PENDING and ERROR dispatches for good, with the error "cancelled"
        in their log, recorded the way the pipeline records a permanent failure. Rows a worker
        has claimed (PROCESSING) or finished are skipped: the lock taken here and the claim's
        own status filter make the two exclusive, so a claimed row is never overwritten and a
        cancelled one is never claimed."""
        now = timezone.now()
        with transaction.atomic():
            rows = list(
                queryset.filter(dispatch_status__in=[Status.PENDING, Status.ERROR])
                .select_for_update()
                .select_related("message")
            )
            errors = [apply_outcome(row, Outcome("failed", CANCELLED), now) for row in rows]
            Dispatch.objects.bulk_update(
                rows,
                ["dispatch_status", "next_attempt_at", "lease_owner", "lease_expires_at"],
                batch_size=500,
            )
            DispatchError.objects.bulk_create([e for e in errors if e], batch_size=500)
            log_actions(request, [row.pk for row in rows], "Cancel")
        skipped = queryset.count() - len(rows)
        note = (
            f"; {skipped} skipped (only pending or error dispatches can be cancelled)"
            if skipped
            else ""
        )
        self.message_user(request, f"{len(rows)} dispatches cancelled{note}", messages.SUCCESS)


@admin.register(ScheduleRequest)
class ScheduleRequestAdmin(ViewOnly, admin.ModelAdmin):
    """schedule_messages.delay() calls not expanded yet: waiting for a worker, or kept with the
    reason they could not be expanded."""

    list_display = ("pk", "time_created", "error")
    list_filter = (("error", admin.EmptyFieldListFilter),)


def dashboard_row(m: dashboard.MessengerFigures, minutes: list[Any]) -> dict[str, Any]:
    """A messenger's row and chart on the dashboard, each count linked to its dispatches."""
    changelist = reverse("admin:sitemessage_dispatch_changelist")
    messenger = urlencode({"messenger": m.alias})
    waited = None if m.oldest_pending is None else round(m.oldest_pending.total_seconds())
    return {
        "figures": m,
        "counts": [
            (status, m.counts[status], f"{changelist}?{messenger}&dispatch_status__exact={status}")
            for status in Status.values
        ],
        "waited": None if waited is None else timedelta(seconds=waited),
        "waited_seconds": "" if waited is None else waited,
        "chart": dashboard.chart_svg(minutes, m.sent, m.failed),
        "sent": sum(m.sent),
        "failed": sum(m.failed),
    }


def log_actions(request: HttpRequest, pks: list[int], action: str) -> None:
    """Records who ran an action on which dispatches, in each dispatch's admin history."""
    user: Any = request.user
    if pks:
        LogEntry.objects.log_actions(
            user_id=user.pk,
            queryset=Dispatch.objects.filter(pk__in=pks),
            action_flag=CHANGE,
            change_message=f'Action "{action}"',
        )
