pytest_plugins = ["tests.fixtures_service"]
