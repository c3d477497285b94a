"""Celery tasks. They take primary keys (never model instances) and are safe to run twice."""
