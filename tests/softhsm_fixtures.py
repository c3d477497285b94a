"""pytest plugin: a private SoftHSM2 token for the whole test session.

Register it with ``pytest_plugins = ["tests.softhsm_fixtures"]`` in ``tests/conftest.py``
(or ``-p tests.softhsm_fixtures``). SoftHSM reads ``SOFTHSM2_CONF`` when the module is
initialised, so the fixture sets it before anything loads the module; if something
already did, it makes the process re-initialise so the private configuration applies.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keys import softhsm


@dataclass(frozen=True)
class SoftHSMToken:
    module_path: str
    conf_path: Path
    token_label: str
    user_pin: str
    so_pin: str

    def backend(self, **kwargs: Any) -> Any:
        """A ``Pkcs11Backend`` for this token (imported lazily: fork safety)."""
        from keys.backends.pkcs11 import Pkcs11Backend

        return Pkcs11Backend(self.module_path, self.token_label, self.user_pin, **kwargs)

    def new_token(self, label: str | None = None) -> SoftHSMToken:
        """Another token in the same configuration, with fresh random PINs."""
        token = SoftHSMToken(
            module_path=self.module_path,
            conf_path=self.conf_path,
            token_label=label or random_label(),
            user_pin=secrets.token_hex(8),
            so_pin=secrets.token_hex(8),
        )
        softhsm.init_token(token.conf_path, token.token_label, token.so_pin, token.user_pin)
        return token


def random_label(prefix: str = "test") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSMToken]:
    """A fresh token (random label and PINs) in a private SOFTHSM2_CONF for the session."""
    if not Path(softhsm.SOFTHSM_MODULE).exists() or shutil.which(softhsm.SOFTHSM2_UTIL) is None:
        pytest.fail(
            f"SoftHSM2 is required: {softhsm.SOFTHSM_MODULE} or {softhsm.SOFTHSM2_UTIL} is "
            "missing (apt-get install softhsm2, or deselect with -m 'not softhsm')"
        )
    conf = softhsm.write_conf(tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    _forget_loaded_module()
    token = SoftHSMToken(
        module_path=softhsm.SOFTHSM_MODULE,
        conf_path=conf,
        token_label=random_label("session"),
        user_pin=secrets.token_hex(8),
        so_pin=secrets.token_hex(8),
    )
    softhsm.init_token(conf, token.token_label, token.so_pin, token.user_pin)
    try:
        yield token
    finally:
        _forget_loaded_module()
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def pkcs11_backend(softhsm_token: SoftHSMToken) -> Any:
    return softhsm_token.backend()


def _forget_loaded_module() -> None:
    # Only if the process already loaded PKCS#11: importing python-pkcs11 is harmless,
    # but re-initialising makes the module read the SOFTHSM2_CONF set above.
    import sys

    if "keys.backends.pkcs11" in sys.modules:
        sys.modules["keys.backends.pkcs11"].reset_process_state()
