from django.contrib import admin
from django.urls import path

from dispatcher import monitoring
from dispatcher.views import get_sitemessage_urls

# The admin, the Prometheus endpoint (staff or SITEMESSAGE_METRICS_TOKEN), and the unsubscribe
# and read links of messages (SITEMESSAGE_SITE_URL says where this site is reached from outside).
urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", monitoring.metrics, name="sitemessage_metrics"),
    *get_sitemessage_urls(),
]
