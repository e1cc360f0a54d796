from dispatcher.views import get_sitemessage_urls, mark_read, unsubscribe

__all__ = ["get_sitemessage_urls", "mark_read", "unsubscribe"]
