"""Alembic migrations of the sessionflow store (installed as ``sessionflow.migrations``)."""
