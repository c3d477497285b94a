pytest_plugins = [
    "tests.softhsm_fixtures",
    "tests.fixtures_service",
    "tests.fixtures_browser",
    "tests.redis_fixtures",
    "tests.oidc_issuer",
]
