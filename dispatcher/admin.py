from django.contrib import admin

from .models import Dispatch, DispatchError, Message


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
