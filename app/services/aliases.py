"""Aliases and tags of models.

An alias is a name for one ready model that deployments use in its place: `GET /aliases/{name}`, and the Hub
repository `cbd/<name>` (and its siblings, `cbd/<name>-GGUF`), which serves the files and the commit id of the model
it points at now (app/services/hub.py). Names follow the Hub's repository-name rule (huggingface_hub's own
`validate_repo_id`, so every alias works with `snapshot_download`), in lowercase ASCII: a client's cache folder is
named after the repository, and `cbd/Prod` and `cbd/prod` would share one on a case-insensitive file system (macOS,
Windows). An alias cannot be taken for a model id (`mdl_...`) or for a sibling (`...-gguf`, `...-onnx`, any case).

Moving an alias is a compare-and-set: read the model it points at, then one UPDATE guarded by that model (or, when
there is none, one INSERT guarded by the primary key), read again and retried when another request changed it in
between. Concurrent moves are so serialized on SQLite and PostgreSQL alike: the last one wins, and each reports the
model it really moved the alias from (as its `alias.moved` event does); a single UPSERT would not say what it
replaced. An alias goes with its model when the model is deleted.

Tags label models for `GET /models?tag=`: a set per model, each added once however often it is put.
"""

from __future__ import annotations

import re

from huggingface_hub.utils import HFValidationError, validate_repo_id
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError, not_found
from app.models import Alias, ModelTag, utcnow
from app.schemas import AliasOut
from app.services import webhooks
from app.services.hub import NAMESPACE, SIBLINGS
from app.services.models import get_model
from app.services.pagination import where_given
from app.services.sources import invalid
from app.settings import Settings

ALIAS_CHARACTERS = re.compile(r"[a-z0-9._-]+")
MODEL_ID_PREFIX = "mdl_"  # app.models.new_id("mdl")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MOVE_ATTEMPTS = 8  # an attempt fails only when another request moved the alias in between


def check_name(name: str) -> None:
    """422 unless `name` may be an alias (the rules above)."""
    if not ALIAS_CHARACTERS.fullmatch(name):
        raise invalid("name", "an alias is lowercase letters, digits, '-', '_' and '.'")
    try:
        validate_repo_id(f"{NAMESPACE}/{name}")
    except HFValidationError as error:
        raise invalid("name", str(error)) from None
    if name.startswith(MODEL_ID_PREFIX):
        raise invalid("name", f"an alias may not start with {MODEL_ID_PREFIX!r}, as model ids do")
    for suffix in SIBLINGS:
        if name.endswith(suffix.lower()):
            raise invalid("name", f"an alias may not end with {suffix!r}: {NAMESPACE}/<name>{suffix} is the "
                                  "repository of a model's exports")


def check_tag(tag: str) -> None:
    if not TAG.fullmatch(tag):
        raise invalid("tag", "a tag is 1 to 64 letters, digits, '-', '_' and '.', the first a letter or digit")


def alias_out(alias: Alias) -> AliasOut:
    return AliasOut(name=alias.name, model=alias.model_id, hub_repo_id=f"{NAMESPACE}/{alias.name}",
                    previous=alias.previous_model_id, updated_by=alias.updated_by, updated_at=alias.updated_at)


def get_alias(session: Session, name: str) -> Alias:
    alias = session.scalar(select(Alias).where(Alias.name == name).execution_options(populate_existing=True))
    if alias is None:
        raise not_found("alias", name)
    return alias


def list_aliases(session: Session, model_id: str | None) -> list[AliasOut]:
    query = where_given(select(Alias), (Alias.model_id, model_id)).order_by(Alias.name)
    return [alias_out(alias) for alias in session.scalars(query)]


def set_alias(session: Session, settings: Settings, model_id: str, name: str, who: str) -> tuple[AliasOut, bool]:
    """(the alias, created): point `name` at the ready model `model_id`, from wherever it pointed. 409 for a model
    that is not ready (an alias serves files), or when other requests kept moving the alias meanwhile."""
    check_name(name)
    for _ in range(MOVE_ATTEMPTS):
        model = get_model(session, model_id)
        if model.status != "ready":
            raise ApiError(409, f"model {model.id} is {model.status}; an alias points at a ready model")
        current = session.scalar(select(Alias.model_id).where(Alias.name == name))
        if current == model.id:
            return alias_out(get_alias(session, name)), False
        alias = Alias(name=name, model_id=model.id, previous_model_id=current, updated_by=who, updated_at=utcnow())
        if _compare_and_set(session, alias, current):
            session.commit()
            out = alias_out(alias)
            webhooks.send(settings, [webhooks.event("alias.created" if current is None else "alias.moved",
                                                    alias=out)], {})
            return out, current is None
        session.rollback()
    raise ApiError(409, f"alias {name!r} is being moved by other requests; retry")


def _compare_and_set(session: Session, alias: Alias, current: str | None) -> bool:
    """One guarded write: the UPDATE while the alias still points at `current`, or the INSERT when there was none;
    whether it was written (uncommitted)."""
    values = {"model_id": alias.model_id, "previous_model_id": alias.previous_model_id,
              "updated_by": alias.updated_by, "updated_at": alias.updated_at}
    if current is None:
        try:
            session.execute(insert(Alias).values(name=alias.name, **values))
        except IntegrityError:  # another request made it first (or the model was deleted): read again
            return False
        return True
    moved = session.execute(update(Alias).where(Alias.name == alias.name, Alias.model_id == current).values(**values)
                            .execution_options(synchronize_session=False))
    return moved.rowcount == 1


def delete_alias(session: Session, settings: Settings, name: str, model_id: str | None = None) -> None:
    """Remove the alias if it still points where it was read: at `model_id` when given (404 otherwise)."""
    alias = get_alias(session, name)
    if model_id is not None and alias.model_id != model_id:
        raise ApiError(404, f"alias {name!r} points at model {alias.model_id}, not at {model_id}")
    out = alias_out(alias)
    removed = session.execute(delete(Alias).where(Alias.name == name, Alias.model_id == alias.model_id)
                              .execution_options(synchronize_session=False))
    if removed.rowcount != 1:
        session.rollback()
        raise ApiError(409, f"alias {name!r} was moved while being deleted; read it again")
    session.commit()
    webhooks.send(settings, [webhooks.event("alias.deleted", alias=out)], {})


def add_tag(session: Session, model_id: str, tag: str) -> None:
    check_tag(tag)
    get_model(session, model_id)
    session.add(ModelTag(model_id=model_id, tag=tag))
    try:
        session.commit()
    except IntegrityError:  # the model has it already (or was deleted meanwhile: 404)
        session.rollback()
        get_model(session, model_id)


def remove_tag(session: Session, model_id: str, tag: str) -> None:
    get_model(session, model_id)
    removed = session.execute(delete(ModelTag).where(ModelTag.model_id == model_id, ModelTag.tag == tag))
    if removed.rowcount != 1:
        raise ApiError(404, f"model {model_id} has no tag {tag!r}")
    session.commit()
