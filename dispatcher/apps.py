from importlib import import_module
from types import ModuleType

from django.apps import AppConfig, apps
from django.core import checks
from django.utils.module_loading import module_has_submodule

from . import conf


class DispatcherConfig(AppConfig):
    name = "dispatcher"
    label = "sitemessage"
    verbose_name = "Site messages"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from messengers.registry import register_from_settings

        from . import backends, messages

        # A bad setting stops every process at startup (manage.py, workers, beat), naming it.
        conf.validate()
        checks.register(conf.unknown_settings)
        if conf.INIT_BUILTIN_MESSAGE_TYPES.get():
            messages.register_builtin_message_types()
        messages.register_message_types(backends.EmailBackendMessage)  # EMAIL_BACKEND's, always
        register_from_settings(conf.MESSENGERS.get())
        # Apps register their own messengers and message types in sitemessages.py.
        import_project_sitemessage_modules()


def import_app_sitemessage_module(app: str) -> ModuleType | None:
    """Imports the SITEMESSAGE_APP_MODULE_NAME module (``sitemessages``) of an app, which
    registers the messengers and message types it holds, and returns it; None when the app has
    none. ``app`` is named as INSTALLED_APPS may name it: its package, its AppConfig's dotted
    path, or its label. What importing the module raises propagates."""
    package = _package_of(app)
    name = conf.APP_MODULE_NAME.get()
    if not module_has_submodule(import_module(package), name):
        return None
    return import_module(f"{package}.{name}")


def import_project_sitemessage_modules() -> list[ModuleType]:
    """Imports the SITEMESSAGE_APP_MODULE_NAME module of every installed app that has one, in
    INSTALLED_APPS order (the app does so when it is ready); returns those modules."""
    found = (import_app_sitemessage_module(config.name) for config in apps.get_app_configs())
    return [module for module in found if module is not None]


def _package_of(app: str) -> str:
    """The package of the installed app that ``app`` names; ``app`` itself when none does."""
    for config in apps.get_app_configs():
        config_path = f"{type(config).__module__}.{type(config).__qualname__}"
        if app in (config.name, config.label, config_path):
            return config.name
    return app
