"""Bundles stored without PostgreSQL's compression attempt (STORAGE EXTERNAL).

A bundle (~3 KB of base64 and JSON) is over the 2 KB TOAST threshold, so PostgreSQL tries
pglz on every one, fails to save the 25% it asks for, and stores it uncompressed out of line
anyway: about 40 microseconds of server CPU per signature for nothing (docs/benchmarks.md,
Re-signing). EXTERNAL stores it the same way without trying. Existing rows stay as they are
(already uncompressed); SQLite has no such setting.
"""

from django.db import migrations

TABLE_COLUMN = 'ALTER TABLE "signing_service_signaturebundle" ALTER COLUMN "json" SET STORAGE '


def _storage(strategy: str):  # type: ignore[no-untyped-def]
    def apply(apps, schema_editor) -> None:  # type: ignore[no-untyped-def]
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(TABLE_COLUMN + strategy)

    return apply


class Migration(migrations.Migration):
    dependencies = [("signing_service", "0012_signature_resign_index_without_attempts")]

    operations = [migrations.RunPython(_storage("EXTERNAL"), _storage("EXTENDED"))]
