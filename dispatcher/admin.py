"""The admin: messages with their dispatches, dispatches with their error log, and the
"Retry now" action for failed dispatches."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from .models import Dispatch, DispatchError, Message
from .toolbox import publish_dispatches

Status = Dispatch.Status


class DispatchInline(admin.TabularInline):
    model = Dispatch
    fields = ("messenger", "address", "status", "attempts", "sent_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("pk", "cls", "sender", "priority", "time_created")
    list_filter = ("cls", "priority")
    inlines = [DispatchInline]


class DispatchErrorInline(admin.TabularInline):
    model = DispatchError
    readonly_fields = ("attempt", "exc_type", "error", "time_created")
    extra = 0
    can_delete = False


@admin.register(Dispatch)
class DispatchAdmin(admin.ModelAdmin):
    list_display = (
        "pk",
        "messenger",
        "address",
        "status",
        "attempts",
        "next_attempt_at",
        "sent_at",
    )
    list_filter = ("status", "messenger")
    search_fields = ("address", "provider_message_id")
    raw_id_fields = ("message", "recipient")
    inlines = [DispatchErrorInline]
    actions = ["retry_now"]

    @admin.action(description="Retry now", permissions=["change"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Dispatch]) -> None:
        """Gives the selected FAILED and ERROR dispatches a fresh attempt budget and publishes
        them at once; delivery claims them like any other pending dispatch."""
        with transaction.atomic():
            rows = list(
                queryset.filter(status__in=[Status.FAILED, Status.ERROR])
                .select_for_update()
                .values_list("pk", "messenger")
            )
            Dispatch.objects.filter(pk__in=[pk for pk, _ in rows]).update(
                status=Status.PENDING,
                attempts=0,
                next_attempt_at=timezone.now(),
                lease_owner="",
                lease_expires_at=None,
            )
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
