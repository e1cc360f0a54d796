"""The seed's messenger example imports ``from .utils import ...``: it was written as a module
sitting next to sitemessage's utils. This shim gives the verbatim copy in sitemessages.py that
neighbour; user code imports from ``sitemessage.utils``."""

from sitemessage.utils import MessengerBase, register_messenger_objects

__all__ = ["MessengerBase", "register_messenger_objects"]
