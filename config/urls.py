from django.contrib import admin
from django.urls import path

from dispatcher.views import get_sitemessage_urls

# The admin, and the unsubscribe and read links of messages (SITEMESSAGE_SITE_URL says where
# this site is reached from outside).
urlpatterns = [path("admin/", admin.site.urls), *get_sitemessage_urls()]
