from messengers.exceptions import (
    DeliveryError,
    InvalidAddressError,
    InvalidContextError,
    MessengerConfigurationError,
    PermanentDeliveryError,
    ScheduleError,
    SitemessageError,
    TemporaryDeliveryError,
    UnknownMessageTypeError,
    UnknownMessengerError,
)

__all__ = [
    "DeliveryError",
    "InvalidAddressError",
    "InvalidContextError",
    "MessengerConfigurationError",
    "PermanentDeliveryError",
    "ScheduleError",
    "SitemessageError",
    "TemporaryDeliveryError",
    "UnknownMessageTypeError",
    "UnknownMessengerError",
]
