"""The type aliases of the public API under django-sitemessage's names
(``sitemessage.utils.TypeUser``, ``sitemessage.toolbox.TypeMessages``, ...), for annotating
code that calls it. Like the models, import it once Django is set up."""

from __future__ import annotations

from typing import TypeAlias

from django.contrib.auth.base_user import AbstractBaseUser

from messengers.base import MessengerBase

from .messages import MessageBase

#: A user that messages are sent by or to (any user model).
TypeUser: TypeAlias = AbstractBaseUser
#: One recipient: a user, an address, or a user id (as Subscription.create() takes it).
TypeRecipient: TypeAlias = int | str | TypeUser
TypeRecipients: TypeAlias = TypeRecipient | list[TypeRecipient]
#: A message type, or its alias.
TypeMessage: TypeAlias = str | type[MessageBase]
#: A messenger class, or its alias.
TypeMessenger: TypeAlias = str | type[MessengerBase]
#: What schedule_messages() takes: a message, or a text for a plain one, or a list of them.
TypeMessages: TypeAlias = str | MessageBase | list[str | MessageBase]
