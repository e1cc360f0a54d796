"""Celery plumbing: the app (``workers.app``), queue names, publishing (``workers.broker``) and
the worker process lifecycle.

Importing this package builds no Celery app: a project with an app of its own uses
``workers.broker`` and ``workers.queues`` without a second app becoming the current one.
"""
