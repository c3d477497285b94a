"""``field__any=[...]``: ``field IN (...)`` that stays one parameter on PostgreSQL.

Re-signing works in chunks of 500 ids. ``pk__in`` sends those as 500 placeholders, which
psycopg splits out of the statement and quotes one by one in Python (it caches that only for
short statements), Django prepares one by one, and PostgreSQL parses back: about a twentieth
of the per-signature work (docs/benchmarks.md, Re-signing). ``pk__any`` sends them to
PostgreSQL as one array (``= ANY(%s)``); other databases get the plain ``IN``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db.models import Field
from django.db.models.lookups import In


@Field.register_lookup
class AnyOf(In):
    lookup_name = "any"

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, Any]:
        if connection.vendor != "postgresql" or not self.rhs_is_direct_value():
            return super().as_sql(compiler, connection)
        field = self.lhs.output_field
        # The values are prepared already (get_prep_lookup); NULL never equals anything.
        values = [
            field.get_db_prep_value(v, connection, prepared=True) for v in self.rhs if v is not None
        ]
        if not values:
            raise EmptyResultSet
        lhs, lhs_params = self.process_lhs(compiler, connection)
        return f"{lhs} = ANY(%s)", (*lhs_params, values)
