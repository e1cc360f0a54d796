from dispatcher.shortcuts import (
    schedule_email,
    schedule_facebook_message,
    schedule_jabber_message,
    schedule_telegram_message,
    schedule_tweet,
    schedule_vkontakte_message,
)

__all__ = [
    "schedule_email",
    "schedule_facebook_message",
    "schedule_jabber_message",
    "schedule_telegram_message",
    "schedule_tweet",
    "schedule_vkontakte_message",
]
