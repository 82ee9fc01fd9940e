from tests.integration.conftest import agent, daemons  # noqa: F401 - the same fixtures
