"""Loaded by pytest before Django (``-p tests.testenv`` in pyproject): isolate the test run.

Tests must never read or write the developer's ``./var`` (tokens, PINs, database).
"""

import os
import tempfile

os.environ.setdefault("MODELSIGN_ENV", "test")
os.environ.setdefault("VAR_DIR", tempfile.mkdtemp(prefix="modelsign-test-var-"))
os.environ.pop("SOFTHSM2_CONF", None)
os.makedirs(os.path.join(os.environ["VAR_DIR"], "static"), exist_ok=True)

if os.environ["VAR_DIR"].startswith(tempfile.gettempdir()):
    import atexit
    import shutil

    atexit.register(shutil.rmtree, os.environ["VAR_DIR"], True)
