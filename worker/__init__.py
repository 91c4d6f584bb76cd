"""Workers: the Celery app (light, importable by the API) and the tasks that call the engine (heavy)."""
