"""Key ceremonies: a quorum of distinct custodians, fresh second factors, nothing half-done."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.utils import timezone

from approvals.groups import custodian_group
from keys import ceremonies
from keys.models import CeremonyState, KeyCeremony, KeyState, SigningKey
from signing_service.models import AuditEntry
from signing_service.signing import SigningRefused
from tests.fixtures_service import authed, request_body, totp_code, totp_device
from tests.redis_fixtures import database_url

pytestmark = pytest.mark.softhsm
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def custodian(make_user: Any) -> Any:
    def make(name: str, authorities: tuple[str, ...] = ("staging",)) -> Any:
        user = make_user(name, approves=())
        for authority in authorities:
            user.groups.add(Group.objects.get_or_create(name=custodian_group(authority))[0])
        return user

    return make


def now() -> Any:
    return timezone.now()


@pytest.mark.django_db
def test_two_custodians_create_exactly_one_active_key(
    custodian: Any, active_keys: Any, api: Any, issue_token: Any
) -> None:
    old = active_keys["staging"]
    c = ceremonies.open_ceremony("staging", custodian("kim"), otp_verified_at=now())
    assert SigningKey.objects.filter(authority="staging").count() == 1  # nothing generated yet
    done = ceremonies.confirm(c.pk, custodian("lee"), otp_verified_at=now())
    assert done.state == CeremonyState.COMPLETED and done.key is not None
    assert list(SigningKey.objects.filter(authority="staging", state=KeyState.ACTIVE)) == [done.key]
    assert SigningKey.objects.get(pk=old.pk).state == KeyState.TRANSITION
    signed = (
        authed(api, issue_token())
        .post("/api/v1/signing-requests/", request_body(), format="json")
        .json()
    )
    assert signed["state"] == "signed" and signed["key"]["hint"] == done.key.hint
    transcript = AuditEntry.objects.get(action="key.activated", target_id=str(done.key.pk)).data
    assert [w["custodian_identity"] for w in transcript["custodians"]] == [
        "kim@company.com",
        "lee@company.com",
    ]
    assert transcript["attributes_checked"]["CKA_NEVER_EXTRACTABLE"] is True


@pytest.mark.django_db
def test_one_custodian_confirming_twice_does_not_complete(custodian: Any, active_keys: Any) -> None:
    kim = custodian("kim")
    c = ceremonies.open_ceremony("staging", kim, otp_verified_at=now())
    with pytest.raises(SigningRefused) as exc:
        ceremonies.confirm(c.pk, kim, otp_verified_at=now())
    assert exc.value.code == "already_confirmed"
    assert KeyCeremony.objects.get(pk=c.pk).state == CeremonyState.OPEN
    assert SigningKey.objects.filter(authority="staging").count() == 1


@pytest.mark.django_db
def test_outsiders_and_stale_codes_are_refused(
    custodian: Any, make_user: Any, active_keys: Any
) -> None:
    with pytest.raises(SigningRefused, match="not a key custodian"):
        ceremonies.open_ceremony("staging", make_user("alice"), otp_verified_at=now())
    with pytest.raises(SigningRefused, match="not a key custodian"):
        ceremonies.open_ceremony(
            "staging", custodian("pat", ("production",)), otp_verified_at=now()
        )
    with pytest.raises(SigningRefused, match="fresh authenticator code"):
        ceremonies.open_ceremony(
            "staging", custodian("kim"), otp_verified_at=now() - timedelta(minutes=6)
        )
    c = ceremonies.open_ceremony("staging", custodian("lee"), otp_verified_at=now())
    with pytest.raises(SigningRefused, match="fresh authenticator code"):
        ceremonies.confirm(c.pk, custodian("max"), otp_verified_at=None)
    with pytest.raises(SigningRefused) as exc:
        ceremonies.open_ceremony("staging", custodian("ned"), otp_verified_at=now())
    assert exc.value.code == "ceremony_open"


@pytest.mark.django_db
def test_expired_and_aborted_ceremonies_leave_no_key(custodian: Any, active_keys: Any) -> None:
    kim, lee = custodian("kim"), custodian("lee")
    c = ceremonies.open_ceremony("staging", kim, otp_verified_at=now())
    KeyCeremony.objects.filter(pk=c.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(SigningRefused, match="expired"):
        ceremonies.confirm(c.pk, lee, otp_verified_at=now())
    assert KeyCeremony.objects.get(pk=c.pk).state == CeremonyState.EXPIRED
    c2 = ceremonies.open_ceremony("staging", kim, otp_verified_at=now())
    ceremonies.abort(c2.pk, kim, "wrong room")
    with pytest.raises(SigningRefused, match="aborted"):
        ceremonies.confirm(c2.pk, lee, otp_verified_at=now())
    assert SigningKey.objects.filter(authority="staging").count() == 1


@pytest.mark.django_db(transaction=True)
def test_killing_the_process_mid_ceremony_leaves_no_active_key(
    custodian: Any, active_keys: Any, hsm: Any, tmp_path: Path
) -> None:
    old = active_keys["staging"]
    c = ceremonies.open_ceremony("staging", custodian("kim"), otp_verified_at=now())
    lee = custodian("lee")
    script = textwrap.dedent(f"""
        import os, signal, django
        django.setup()
        from django.utils import timezone
        from django.contrib.auth import get_user_model
        import keys.ceremonies as ceremonies
        real = ceremonies.register_key
        def die_after_generating(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)  # the key exists on the HSM; nothing committed
        ceremonies.register_key = die_after_generating
        lee = get_user_model().objects.get(username="lee")
        ceremonies.confirm("{c.pk}", lee, otp_verified_at=timezone.now())
    """)
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "PKCS11_MODULE": django_settings.PKCS11_MODULE,
        "PKCS11_PIN_FILE": str(django_settings.PKCS11_PIN_FILE),
        "DJANGO_SETTINGS_MODULE": "signing_service.settings",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == -9, result.stderr
    assert list(SigningKey.objects.filter(authority="staging", state=KeyState.ACTIVE)) == [old]
    assert SigningKey.objects.filter(authority="staging").count() == 1
    ceremony = KeyCeremony.objects.get(pk=c.pk)
    assert ceremony.state == CeremonyState.OPEN and ceremony.confirmations.count() == 1
    done = ceremonies.confirm(c.pk, lee, otp_verified_at=now())  # the ceremony can still finish
    assert done.state == CeremonyState.COMPLETED


@pytest.mark.django_db
def test_the_runbook_command_runs_a_ceremony(custodian: Any, active_keys: Any, capsys: Any) -> None:
    kim, lee = custodian("kim"), custodian("lee")
    kim_code, lee_code = totp_code(totp_device(kim)), totp_code(totp_device(lee))
    call_command(
        "key_ceremony", "open", "--authority", "staging", "--user", "kim", "--otp", kim_code
    )
    ceremony = KeyCeremony.objects.get()
    call_command("key_ceremony", "confirm", str(ceremony.pk), "--user", "lee", "--otp", lee_code)
    out = capsys.readouterr().out
    assert "1 of 2 custodians" in out and "completed: new active key" in out
    assert KeyCeremony.objects.get().state == CeremonyState.COMPLETED


@pytest.mark.django_db
def test_two_custodians_destroy_a_retired_key_on_the_hsm(
    custodian: Any, active_keys: Any, hsm: Any
) -> None:
    from keys import registry
    from keys.backends.base import KeyNotUsable
    from keys.lifecycle import transition

    old = active_keys["staging"]
    kim, lee = custodian("kim"), custodian("lee")
    with pytest.raises(SigningRefused, match="only a retired or revoked key"):
        ceremonies.open_ceremony("staging", kim, otp_verified_at=now(), purpose="destroy", key=old)
    transition(old.pk, KeyState.TRANSITION, actor="t")
    transition(old.pk, KeyState.RETIRED, actor="t")
    c = ceremonies.open_ceremony(
        "staging",
        kim,
        otp_verified_at=now(),
        purpose="destroy",
        key=SigningKey.objects.get(pk=old.pk),
    )
    assert registry.backend_for(old).public_key(old.key_ref) is not None  # still on the token
    ceremonies.confirm(c.pk, lee, otp_verified_at=now())
    destroyed = SigningKey.objects.get(pk=old.pk)
    assert destroyed.destroyed_at is not None and destroyed.public_key_pem == old.public_key_pem
    with pytest.raises(KeyNotUsable, match="no private key"):
        registry.backend_for(old).check_usable(old.key_ref)
    entry = AuditEntry.objects.get(action="key.destroyed")
    assert [w["custodian_identity"] for w in entry.data["custodians"]] == [
        "kim@company.com",
        "lee@company.com",
    ]
