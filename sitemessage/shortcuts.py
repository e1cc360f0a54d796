from dispatcher.shortcuts import (
    schedule_email,
    schedule_jabber_message,
    schedule_telegram_message,
    schedule_tweet,
)

__all__ = [
    "schedule_email",
    "schedule_jabber_message",
    "schedule_telegram_message",
    "schedule_tweet",
]
