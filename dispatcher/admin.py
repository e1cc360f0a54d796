"""The admin: messages with their dispatches, dispatches with their error log, and the
"Retry now" and "Cancel" actions.

Everything here is delivery bookkeeping, so every form is view-only and nothing can be added by
hand: scheduling validates addresses and contexts, a form would not. A dispatch's status changes
only through the two actions, which take the rows they change under a lock and skip rows a
worker holds. Deleting (which loses the history) is left to superusers.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.options import BaseModelAdmin
from django.db import transaction
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from messengers.base import Outcome

from .models import Dispatch, DispatchError, Message, ScheduleRequest
from .pipeline import apply_outcome
from .toolbox import publish_dispatches

Status = Dispatch.Status
#: Dispatches the message page lists; the rest are one click away, in the dispatch list.
INLINE_DISPATCHES = 100
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


class FirstDispatches(BaseInlineFormSet):
    """The first INLINE_DISPATCHES dispatches of a message, so a message sent to 100,000
    recipients still renders."""

    def get_queryset(self) -> QuerySet[Any]:
        if not hasattr(self, "_queryset"):
            self._queryset = super().get_queryset()[:INLINE_DISPATCHES]
        return self._queryset


class DispatchInline(ViewOnly, admin.TabularInline):
    model = Dispatch
    formset = FirstDispatches
    fields = ("messenger", "address", "dispatch_status", "retry_count", "sent_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = f"dispatches (at most {INLINE_DISPATCHES} here)"


@admin.register(Message)
class MessageAdmin(ViewOnly, admin.ModelAdmin):
    list_display = ("pk", "cls", "sender", "priority", "time_created")
    list_filter = ("cls", "priority")
    readonly_fields = ("all_dispatches",)
    inlines = [DispatchInline]

    @admin.display(description="dispatches")
    def all_dispatches(self, obj: Message) -> str:
        url = reverse("admin:sitemessage_dispatch_changelist")
        count = obj.dispatches.count()  # type: ignore[attr-defined]
        return format_html('<a href="{}?message__id__exact={}">all {}</a>', url, obj.pk, count)


class DispatchErrorInline(ViewOnly, admin.TabularInline):
    model = DispatchError
    readonly_fields = ("attempt", "exc_type", "error_log", "time_created")
    extra = 0
    can_delete = False


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
    )
    list_filter = ("dispatch_status", "messenger")
    search_fields = ("address", "provider_message_id")
    inlines = [DispatchErrorInline]
    actions = ["retry_now", "cancel"]

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
