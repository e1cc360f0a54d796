"""A project URLconf with django-sitemessage's link views attached, as its README says."""

from sitemessage.toolbox import get_sitemessage_urls

urlpatterns = get_sitemessage_urls()
