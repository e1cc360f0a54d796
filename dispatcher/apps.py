from django.apps import AppConfig
from django.core import checks


class DispatcherConfig(AppConfig):
    name = "dispatcher"
    label = "sitemessage"
    verbose_name = "Site messages"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        from messengers.registry import register_from_settings

        from . import conf, messages

        # A bad setting stops every process at startup (manage.py, workers, beat), naming it.
        conf.validate()
        checks.register(conf.unknown_settings)
        messages.register_builtin_message_types()
        register_from_settings(conf.MESSENGERS.get())
        # Apps register their own messengers and message types in sitemessages.py.
        autodiscover_modules("sitemessages")
