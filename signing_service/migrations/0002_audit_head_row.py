from django.db import migrations


def create_head(apps, schema_editor):
    # The head row must exist before the first append, so appends only ever lock it.
    apps.get_model("signing_service", "AuditHead").objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [("signing_service", "0001_requests_signatures_tokens_audit")]
    operations = [migrations.RunPython(create_head, migrations.RunPython.noop)]
