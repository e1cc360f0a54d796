from dispatcher.templatetags.sitemessage import (
    detect_clause,
    register,
    sitemessage_prefs_table,
    sitemessage_prefs_tableNode,
)

__all__ = ["detect_clause", "register", "sitemessage_prefs_table", "sitemessage_prefs_tableNode"]
