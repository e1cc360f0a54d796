"""A project URLconf without the link views."""

urlpatterns: list = []
