"""manage.py create_user: how an operator gives people the approver and custodian roles."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from keys.ceremonies import is_custodian
from signing_service.models import AuditEntry

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("create_user", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_it_creates_a_custodian_with_a_generated_password_printed_once() -> None:
    printed = run("kim", "--email", "kim@company.com", "--custodian", "staging").strip()
    kim = get_user_model().objects.get(username="kim")
    assert kim.check_password(printed)
    assert is_custodian(kim, "staging") and not is_custodian(kim, "production")
    assert AuditEntry.objects.filter(action="user.created").count() == 1


def test_a_password_file_is_used_and_nothing_is_printed(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("correct horse battery staple\n")
    assert run("ana", "--email", "ana@company.com", "--approver", "production",
               "--password-file", str(secret)) == ""  # fmt: skip
    ana = get_user_model().objects.get(username="ana")
    assert ana.check_password("correct horse battery staple")
    assert list(ana.groups.values_list("name", flat=True)) == ["approvers:production"]


def test_roles_are_added_to_an_existing_user_without_touching_the_password() -> None:
    password = run("kim", "--email", "kim@company.com", "--custodian", "staging").strip()
    assert run("kim", "--email", "kim@company.com", "--approver", "production") == ""
    kim = get_user_model().objects.get(username="kim")
    assert kim.check_password(password)
    assert sorted(kim.groups.values_list("name", flat=True)) == [
        "approvers:production", "custodians:staging"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--custodian", "nowhere"], "unknown authority 'nowhere'; the policy has: production"),
        (["--approver", "prod"], "unknown authority 'prod'"),
    ],
)
def test_bad_roles_are_refused_and_nothing_is_created(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("lee", "--email", "lee@company.com", *args)
    assert not get_user_model().objects.filter(username="lee").exists()


def test_another_persons_username_is_refused() -> None:
    run("kim", "--email", "kim@company.com")
    with pytest.raises(CommandError, match=re.escape("exists with email 'kim@company.com'")):
        run("kim", "--email", "mallory@company.com", "--custodian", "production")
    assert not get_user_model().objects.get(username="kim").groups.exists()


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(CommandError, match="is empty"):
        run("lee", "--email", "lee@company.com", "--password-file", str(tmp_path / "pw"))
