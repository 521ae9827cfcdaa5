"""Celery app, task bodies (parse, gpu jobs), reaper and reconciler; embedded in-process runner."""
