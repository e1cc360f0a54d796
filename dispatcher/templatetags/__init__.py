"""Template tag libraries of the app: ``{% load sitemessage %}``."""
