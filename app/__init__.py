"""The CBD model factory's REST service: FastAPI app, ORM, services. Never imports torch."""
