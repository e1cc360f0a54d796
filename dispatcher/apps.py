from django.apps import AppConfig


class DispatcherConfig(AppConfig):
    name = "dispatcher"
    label = "sitemessage"
    verbose_name = "Site messages"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings
        from django.utils.module_loading import autodiscover_modules

        from messengers.registry import register_from_settings

        from . import messages

        messages.register_builtin_message_types()
        register_from_settings(getattr(settings, "SITEMESSAGE_MESSENGERS", {}))
        # Apps register their own messengers and message types in sitemessages.py.
        autodiscover_modules("sitemessages")
