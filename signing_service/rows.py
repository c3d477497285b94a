"""INSERTs for the hot paths, without the ORM's per-query work, from the models' own metadata.

Django compiles every ``save()`` and ``bulk_create()`` again: on the signing path that costs
about 0.8 ms of CPU per statement, several times the database's own work (docs/benchmarks.md,
API). :func:`insert` writes what ``Model.save(force_insert=True)`` would (the same columns,
``pre_save`` for defaults and ``auto_now``, ``get_db_prep_save`` for every value, the
auto-increment primary key read back) with an INSERT statement built once per model, row
count and database, so the models stay the single source of truth for tables, columns and
conversions. It is for plain rows: no expressions as values, no signals sent (the service
connects none to these models), no multi-table inheritance. Many rows at once go to
PostgreSQL by COPY instead (:func:`_copy`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from django.db import connections, router
from django.db.models import Field, Model

M = TypeVar("M", bound=Model)

#: Rows per statement; keeps SQLite's bound-variable limit far away for any model here.
BATCH = 500
#: From this many rows on, PostgreSQL receives them by COPY (see :func:`_copy`).
COPY_FROM = 50


def new(model: type[M], **values: Any) -> M:
    """``model(**values)``, built the way Django builds rows it reads (positionally).

    Values are given by attribute name (``key_id``, not ``key``); missing fields get their
    defaults, as with keywords. The keyword path looks at every field for each row (about
    20 us for a Signature here, 6 positionally), and re-signing makes three rows per
    signature.
    """
    args = [
        values.pop(f.attname) if f.attname in values else f.get_default()
        for f in model._meta.concrete_fields
    ]
    if values:
        raise TypeError(f"rows.new: {model.__name__} has no fields {sorted(values)}")
    return model(*args)


def in_model_order(model: type[Model], names: Sequence[str]) -> tuple[str, ...]:
    """``names`` (attribute names of ``model``'s columns) in the model's field order, as
    ``Model.from_db`` takes values; a ValueError names any that are not columns."""
    attnames = [f.attname for f in model._meta.concrete_fields]
    unknown = set(names) - set(attnames)
    if unknown:
        raise ValueError(f"{model.__name__} has no columns {sorted(unknown)}")
    return tuple(name for name in attnames if name in names)


def insert(objs: Sequence[Model]) -> None:
    """INSERT ``objs`` (all of one model, unsaved) in order; set their auto primary keys."""
    if not objs:
        return
    model = type(objs[0])
    if any(type(o) is not model for o in objs):
        raise TypeError("rows.insert: all objects must be of one model")
    alias = router.db_for_write(model)
    connection = connections[alias]
    fields, auto = _columns(model, any(o.pk is None for o in objs))
    if auto is not None and not all(o.pk is None for o in objs):
        raise ValueError("rows.insert: set the primary key on all objects or on none")
    if connection.vendor == "postgresql" and len(objs) >= COPY_FROM:
        _copy(connection, model, objs, auto)
        _saved(objs, alias)
        return
    if auto is not None and not connection.features.can_return_rows_from_bulk_insert:
        model._default_manager.using(alias).bulk_create(objs)  # reads the keys back its way
        return
    for start in range(0, len(objs), BATCH):
        chunk = objs[start : start + BATCH]
        sql = _statement(model, connection.vendor, alias, len(chunk), auto is not None)
        params = [
            f.get_db_prep_save(f.pre_save(obj, add=True), connection=connection)
            for obj in chunk
            for f in fields
        ]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            if auto is not None:
                keys = [row[0] for row in cursor.fetchall()]
                if len(keys) != len(chunk):
                    raise RuntimeError(f"{len(chunk)} {model.__name__} rows, {len(keys)} ids")
                for obj, key in zip(chunk, keys, strict=True):
                    setattr(obj, auto.attname, key)
        _saved(chunk, alias)


def _saved(objs: Sequence[Model], alias: str) -> None:
    for obj in objs:
        obj._state.adding = False
        obj._state.db = alias


def _copy(connection: Any, model: type[Model], objs: Sequence[Model], auto: Field | None) -> None:
    """Many rows on PostgreSQL: COPY, with auto keys drawn from the column's sequence first.

    A 500-row INSERT has thousands of parameters, which psycopg splits out of the statement
    and quotes one by one in Python (it caches that only for statements of at most 50), and
    which PostgreSQL then parses back: about a tenth of re-signing's time. COPY sends the
    same prepared values as rows.
    """
    meta = model._meta
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        if auto is not None:
            cursor.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                [meta.db_table, auto.column, len(objs)],
            )
            for obj, (key,) in zip(objs, cursor.fetchall(), strict=True):
                setattr(obj, auto.attname, key)
        fields = list(meta.local_concrete_fields)
        columns = ", ".join(quote(f.column) for f in fields)
        sql = f"COPY {quote(meta.db_table)} ({columns}) FROM STDIN"
        # The raw cursor's COPY: Django's error translation (IntegrityError...) put back.
        with connection.wrap_database_errors, cursor.cursor.copy(sql) as copy:
            for obj in objs:
                copy.write_row(
                    [f.get_db_prep_save(f.pre_save(obj, add=True), connection) for f in fields]
                )


def _columns(model: type[Model], auto_pk: bool) -> tuple[list[Field], Field | None]:
    """The columns ``save()`` would insert, and the auto field left to the database."""
    meta = model._meta
    if meta.parents:
        raise TypeError(f"rows.insert does not handle multi-table inheritance ({model.__name__})")
    auto = meta.auto_field if auto_pk else None
    fields = [f for f in meta.local_concrete_fields if f is not auto]
    return fields, auto


@functools.cache
def _statement(model: type[Model], vendor: str, alias: str, rows: int, returning: bool) -> str:
    connection = connections[alias]
    quote = connection.ops.quote_name
    fields, auto = _columns(model, returning)
    one = "(" + ", ".join(["%s"] * len(fields)) + ")"
    sql = (
        f"INSERT INTO {quote(model._meta.db_table)} "  # noqa: S608 (names from the model; values bound)
        f"({', '.join(quote(f.column) for f in fields)}) VALUES {', '.join([one] * rows)}"
    )
    if returning and auto is not None:
        sql += f" RETURNING {quote(auto.column)}"
    return sql
