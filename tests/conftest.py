from pathlib import Path

import pytest

pytest_plugins = [
    "tests.softhsm_fixtures",
    "tests.fixtures_service",
    "tests.fixtures_browser",
    "tests.redis_fixtures",
    "tests.oidc_issuer",
]

# `make test` runs the whole suite on SQLite, then these modules again on a real PostgreSQL
# (`pytest --postgres -m postgres`): the ones whose correctness rests on the database's row
# locks, conditional updates, unique constraints and transactions (quorum, idempotency,
# ceremony and re-signing races, worker kill -9 / exactly-once, revocation quarantine, the
# audit chain), plus the API and model tests that hit constraints and column limits.
POSTGRES_MODULES = frozenset(
    {
        "test_postgres_locking",
        "test_key_changes_while_signing",
        "test_approval_concurrency",
        "test_idempotency",
        "test_key_ceremony",
        "test_worker_tasks",
        "test_signing_faults",
        "test_resigning_worker_faults",
        "test_resigning_revocation",
        "test_revocation",
        "test_rotation",
        "test_resigning_rotation",
        "test_resigning_tasks",
        "test_resigning_approval",
        "test_resigning_items",
        "test_resigning_chunks",
        "test_worker_signing_mode",
        "test_audit_chain",
        "test_audit_checkpoints",
        "test_trust_document",
        "test_approval_api",
        "test_approval_rules",
        "test_api_bad_input",
        "test_key_state_machine",
        "test_signatures_api",
        "test_api_representation",
        "test_signature_bundle_migration",
        "test_rows",
        "test_lookups",
    }
)

_renamed = sorted(m for m in POSTGRES_MODULES if not Path(__file__).with_name(f"{m}.py").exists())
if _renamed:
    raise RuntimeError(f"tests/conftest.py POSTGRES_MODULES names missing modules: {_renamed}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in POSTGRES_MODULES:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing() -> None:
    """Users made in this process get a fast password hash (Django's testing advice).

    PBKDF2 at Django's 1,000,000 iterations costs ~0.4 s per user and tests make thousands of
    them; what is under test is who may do what, not the hash. Users made by subprocesses
    (manage.py, the compose stand-in) keep the production hashers.
    """
    from django.conf import settings
    from django.contrib.auth import hashers

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    hashers.get_hashers.cache_clear()
    hashers.get_hashers_by_algorithm.cache_clear()
