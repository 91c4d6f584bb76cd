"""Alembic revisions on SQLite and PostgreSQL: the schema they make is the ORM models', and rows made before 0003 keep
working with the paper's mix."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from app.db import alembic_config, upgrade_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'cbd.sqlite3'}"


def test_models_made_before_0003_are_paper_mix_and_proportional_alpha(database_url: str) -> None:
    upgrade_database(database_url, "0002")
    engine = create_engine(database_url)
    now = "2026-12-01 00:00:00+00"
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO chains (id, name, source, status, spec, owner, created_at) "
            f"VALUES ('chn_1', 'c', 's', 'ready', '{{}}', 'o', '{now}')"))
        connection.execute(text(
            'INSERT INTO anchors (id, chain_id, "index", params, shape, config, status, metrics, created_at) VALUES '
            f"('anc_1', 'chn_1', 0, 2, '{{}}', '{{}}', 'ready', '{{}}', '{now}'), "
            f"('anc_2', 'chn_1', 1, 1, '{{}}', '{{}}', 'ready', '{{}}', '{now}')"))
        for model_id, alpha_request in (("mdl_1", "default"), ("mdl_2", "auto"), ("mdl_3", "0.25")):
            connection.execute(text(
                "INSERT INTO models (id, identity, chain_id, source, params, shape, alpha_request, init, seed, dtype, "
                "engine_version, small_anchor_id, large_anchor_id, status, metrics, provenance, owner, created_at) "
                f"VALUES ('{model_id}', '{model_id}', 'chn_1', 's', 1, '{{}}', '{alpha_request}', 'cbd', 0, "
                f"'float32', '0.1.0', 'anc_2', 'anc_1', 'ready', '{{}}', '{{}}', 'o', '{now}')"))
        connection.execute(text(
            "INSERT INTO jobs (id, kind, status, queue, subject_id, payload, progress, owner, attempts, "
            f"cancel_requested, created_at) VALUES ('job_1', 'materialize_model', 'succeeded', 'cpu', 'mdl_1', '{{}}', "
            f"'{{}}', 'o', 1, false, '{now}')"))
    upgrade_database(database_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, alpha_request, mix, heal FROM models ORDER BY id")).all()
        warnings = connection.execute(text("SELECT warnings FROM jobs")).scalar_one()
    assert [tuple(row) for row in rows] == [("mdl_1", "proportional", "paper", None), ("mdl_2", "auto", "paper", None),
                                            ("mdl_3", "0.25", "paper", None)]
    assert warnings is None
    assert not {c["name"]: c for c in inspect(engine).get_columns("models")}["mix"]["nullable"]
    command.downgrade(alembic_config(database_url), "0002")
    assert "mix" not in {c["name"] for c in inspect(engine).get_columns("models")}
    assert "warnings" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    engine.dispose()


def test_the_migrations_make_the_schema_of_the_orm_models_and_0005_goes_back(database_url: str) -> None:
    """Alembic's own comparison of the migrated database with app/models.py (types included) finds nothing; 0005
    (aliases, model tags) downgrades and upgrades again."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.models import Base

    upgrade_database(database_url)
    engine = create_engine(database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    command.downgrade(alembic_config(database_url), "0004")
    assert not {"aliases", "model_tags"} & set(inspect(engine).get_table_names())
    upgrade_database(database_url)
    assert {"aliases", "model_tags"} <= set(inspect(engine).get_table_names())
    engine.dispose()
