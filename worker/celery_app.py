"""The worker's Celery app: the service's configuration (app/broker.py) with the tasks of worker.tasks.

`celery -A worker.celery_app worker -Q gpu` (or `cbd worker --queue gpu`) runs them."""

from __future__ import annotations

from app.broker import make_celery
from app.settings import Settings

celery = make_celery(Settings(), include=("worker.tasks",))
