"""The PKCS#11 backend against a real SoftHSM2 token (SPEC sections 5, 6, 9, 11)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import secrets
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import (
    decode_ec_private_key,
    decode_ec_public_key,
    encode_named_curve_parameters,
)

from keys import softhsm
from keys.backends import pkcs11 as backend_module
from keys.backends.base import BackendUnavailable, KeyBackendError, KeyNotUsable
from keys.backends.pkcs11 import Pkcs11Backend, read_pin_file
from signing_service.bundle import (
    build_bundle,
    build_statement,
    curve_hash,
    key_hint,
    pae,
    statement_payload,
    verify_bundle,
)
from signing_service.manifest import Resource
from tests.softhsm_fixtures import SoftHSMToken, random_label

softhsm_only = pytest.mark.softhsm


def verify(public_key: ec.EllipticCurvePublicKey, der: bytes, message: bytes) -> None:
    public_key.verify(der, message, ec.ECDSA(curve_hash(public_key)))


@contextlib.contextmanager
def raw_session(token: SoftHSMToken) -> Iterator[Any]:
    """A plain python-pkcs11 session, riding on the backend's (per-process) login."""
    assert token.backend().health().ok
    lib = pkcs11.lib(token.module_path)
    session = lib.get_token(token_label=token.token_label).open(rw=True)
    try:
        yield session
    finally:
        session.close()


def raw_keypair(
    session: Any, token: SoftHSMToken, *, extractable: bool, sensitive: bool = True
) -> tuple[dict[str, str], Any]:
    """An EC key pair made directly with python-pkcs11, bypassing the backend's template."""
    label, key_id = random_label("raw"), secrets.token_bytes(16)
    _, private = session.generate_keypair(
        KeyType.EC,
        id=key_id,
        label=label,
        store=True,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        private_template={Attribute.EXTRACTABLE: extractable, Attribute.SENSITIVE: sensitive},
    )
    return {"token": token.token_label, "label": label, "id": key_id.hex()}, private


def exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


# --- generate, sign, verify --------------------------------------------------------------


@softhsm_only
@pytest.mark.parametrize(
    ("algorithm", "curve", "hash_name"),
    [("ECDSA-P256", "secp256r1", "sha256"), ("ECDSA-P384", "secp384r1", "sha384")],
)
def test_generate_sign_verify(
    pkcs11_backend: Pkcs11Backend, algorithm: str, curve: str, hash_name: str
) -> None:
    label = random_label()
    gen = pkcs11_backend.generate(label, algorithm)

    assert gen.key_ref["token"] == pkcs11_backend.token_label
    assert gen.key_ref["label"] == label
    assert len(bytes.fromhex(gen.key_ref["id"])) == 16
    assert gen.public_key.curve.name == curve
    json.dumps(gen.key_ref), json.dumps(gen.attributes)  # both go to the database/audit log

    message = pae(b'{"statement": "' + secrets.token_hex(8).encode() + b'"}')
    der = pkcs11_backend.sign(gen.key_ref, message)
    decode_dss_signature(der)  # DER, not raw r||s
    verify(gen.public_key, der, message)
    with pytest.raises(InvalidSignature):
        verify(gen.public_key, der, message + b" ")
    # The digest is the one model_signing pairs with the curve.
    prehashed = hashlib.new(hash_name, message).digest()
    hash_cls = type(curve_hash(gen.public_key))
    gen.public_key.verify(der, prehashed, ec.ECDSA(Prehashed(hash_cls())))

    again = pkcs11_backend.public_key(gen.key_ref)
    assert again.public_numbers() == gen.public_key.public_numbers()


@softhsm_only
def test_signature_makes_a_bundle_that_verifies(pkcs11_backend: Pkcs11Backend) -> None:
    gen = pkcs11_backend.generate(random_label(), "ECDSA-P256")
    digest = hashlib.sha256(b"weights").hexdigest()
    payload = statement_payload(build_statement("m", [Resource(name="w.bin", digest=digest)]))
    der = pkcs11_backend.sign(gen.key_ref, pae(payload))
    bundle = build_bundle(payload, der, hint=key_hint(gen.public_key))
    assert verify_bundle(bundle, gen.public_key).root_digest


@softhsm_only
def test_generated_key_attributes(pkcs11_backend: Pkcs11Backend) -> None:
    gen = pkcs11_backend.generate(random_label(), "ECDSA-P256")
    checked = pkcs11_backend.check_usable(gen.key_ref)
    for name in ("SENSITIVE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "LOCAL", "SIGN"):
        assert checked[f"CKA_{name}"] is True, name
        assert gen.attributes[f"CKA_{name}"] is True, name
    assert checked["CKA_EXTRACTABLE"] is False
    assert checked["CKA_TOKEN"] is True and checked["CKA_PRIVATE"] is True
    assert checked["CKA_KEY_TYPE"] == "EC" and checked["curve"] == "secp256r1"
    assert checked["CKA_ID"] == gen.key_ref["id"]
    assert checked["token_label"] == pkcs11_backend.token_label
    assert checked["pairwise_check"] is True


@softhsm_only
def test_generate_refuses_a_label_in_use(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHSMToken
) -> None:
    label = random_label()
    pkcs11_backend.generate(label)
    with pytest.raises(KeyNotUsable, match="already exists"):
        pkcs11_backend.generate(label, "ECDSA-P384")
    with raw_session(softhsm_token) as session:
        assert len(list(session.get_objects({Attribute.LABEL: label}))) == 2  # one pair only


@softhsm_only
def test_generate_refuses_unknown_algorithm(pkcs11_backend: Pkcs11Backend) -> None:
    with pytest.raises(KeyNotUsable, match="unsupported algorithm 'RSA-2048'"):
        pkcs11_backend.generate(random_label(), "RSA-2048")


# --- the private key never leaves the token ----------------------------------------------


@softhsm_only
def test_private_value_cannot_be_read(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHSMToken
) -> None:
    gen = pkcs11_backend.generate(random_label())
    with raw_session(softhsm_token) as session:
        private = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(gen.key_ref["id"])
        )
        with pytest.raises(p11e.AttributeSensitive):
            private[Attribute.VALUE]
        assert Attribute.VALUE not in private.get_attributes([Attribute.VALUE, Attribute.LABEL])
        # The attributes only ever get stricter: they cannot be switched back.
        for attr, value in ((Attribute.SENSITIVE, False), (Attribute.EXTRACTABLE, True)):
            with pytest.raises(p11e.PKCS11Error):
                private[attr] = value
        assert private[Attribute.SENSITIVE] is True and private[Attribute.EXTRACTABLE] is False

        # Control: the same read works on a non-sensitive key, so the test can fail.
        _, readable = raw_keypair(session, softhsm_token, extractable=True, sensitive=False)
        scalar = readable[Attribute.VALUE]  # big-endian; leading zero bytes may be dropped
        assert 0 < len(scalar) <= 32
        ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())


@softhsm_only
def test_private_key_cannot_be_wrapped(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHSMToken
) -> None:
    gen = pkcs11_backend.generate(random_label())
    with raw_session(softhsm_token) as session:
        wrapping_key = session.generate_key(
            KeyType.AES, 256, capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
        )
        private = session.get_key(
            object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(gen.key_ref["id"])
        )
        with pytest.raises(p11e.KeyUnextractable):
            wrapping_key.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)

        # Control: an extractable key wraps fine with the same wrapping key and mechanism.
        _, extractable = raw_keypair(session, softhsm_token, extractable=True)
        assert wrapping_key.wrap_key(extractable, mechanism=Mechanism.AES_KEY_WRAP_PAD)


# --- check_usable refuses keys that do not meet the requirements -------------------------


@softhsm_only
def test_extractable_key_is_refused(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHSMToken
) -> None:
    with raw_session(softhsm_token) as session:
        key_ref, _ = raw_keypair(session, softhsm_token, extractable=True)
    with pytest.raises(KeyNotUsable) as info:
        pkcs11_backend.check_usable(key_ref)
    message = str(info.value)
    assert "EXTRACTABLE is true (must be false)" in message
    assert "NEVER_EXTRACTABLE is false (must be true)" in message
    assert key_ref["label"] in message
    with pytest.raises(KeyNotUsable, match="EXTRACTABLE is true"):
        pkcs11_backend.sign(key_ref, pae(b"{}"))


@softhsm_only
def test_imported_key_is_refused(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHSMToken
) -> None:
    software_key = ec.generate_private_key(ec.SECP256R1())
    label, key_id = random_label("imported"), secrets.token_bytes(16)
    common = {Attribute.TOKEN: True, Attribute.ID: key_id, Attribute.LABEL: label}
    private_attrs = decode_ec_private_key(
        software_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public_attrs = decode_ec_public_key(
        software_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with raw_session(softhsm_token) as session:
        session.create_object(
            {
                **private_attrs,
                **common,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
            }
        )
        session.create_object({**public_attrs, **common, Attribute.VERIFY: True})
    key_ref = {"token": softhsm_token.token_label, "label": label, "id": key_id.hex()}
    with pytest.raises(KeyNotUsable) as info:
        pkcs11_backend.check_usable(key_ref)
    # The value existed outside the token: it is neither local nor "always" sensitive.
    assert "LOCAL is false (must be true)" in str(info.value)
    assert "ALWAYS_SENSITIVE is false (must be true)" in str(info.value)
    assert "EXTRACTABLE is true" not in str(info.value)


@softhsm_only
def test_unknown_or_foreign_keys_are_refused(pkcs11_backend: Pkcs11Backend) -> None:
    gen = pkcs11_backend.generate(random_label())
    unknown = {**gen.key_ref, "id": secrets.token_hex(16)}
    for call in (pkcs11_backend.check_usable, pkcs11_backend.public_key):
        with pytest.raises(KeyNotUsable, match="no private key with id"):
            call(unknown)
    with pytest.raises(KeyNotUsable, match="no private key with id"):
        pkcs11_backend.sign(unknown, pae(b"{}"))
    with pytest.raises(KeyNotUsable, match="this backend uses"):
        pkcs11_backend.sign({**gen.key_ref, "token": "another-token"}, pae(b"{}"))
    with pytest.raises(KeyNotUsable, match="is labelled"):
        pkcs11_backend.sign({**gen.key_ref, "label": "not-its-label"}, pae(b"{}"))
    for bad_id in ("", "zz", None):
        with pytest.raises(KeyNotUsable, match="id must be non-empty hex"):
            pkcs11_backend.sign({**gen.key_ref, "id": bad_id}, pae(b"{}"))
    # The real key still works after all that.
    verify(gen.public_key, pkcs11_backend.sign(gen.key_ref, pae(b"{}")), pae(b"{}"))


# --- availability: PIN, token, recovery --------------------------------------------------


@softhsm_only
def test_wrong_pin_is_unavailable_and_never_shown(softhsm_token: SoftHSMToken) -> None:
    other = softhsm_token.new_token()
    wrong_pin = f"wrong-{secrets.token_hex(8)}"
    bad = Pkcs11Backend(other.module_path, other.token_label, wrong_pin)

    with pytest.raises(BackendUnavailable) as info:
        bad.generate(random_label())
    assert str(info.value) == f"PIN for token {other.token_label!r} was rejected"
    assert wrong_pin not in exception_text(info.value)
    assert wrong_pin not in repr(bad) and wrong_pin not in repr(vars(bad))

    # The same PIN is not tried again right away (it would lock a real HSM) ...
    with pytest.raises(BackendUnavailable, match="not retried"):
        bad.sign({"token": other.token_label, "label": "x", "id": "00"}, pae(b"{}"))
    health = bad.health()
    assert not health.ok and "PIN" in health.detail and wrong_pin not in health.detail
    # ... unless the caller asks for it.
    eager = Pkcs11Backend(other.module_path, other.token_label, wrong_pin, pin_retry_after=0)
    with pytest.raises(BackendUnavailable, match=r"was rejected$"):
        eager.generate(random_label())

    # Recovery: the right PIN works at once.
    good = other.backend()
    gen = good.generate(random_label())
    verify(gen.public_key, good.sign(gen.key_ref, pae(b"{}")), pae(b"{}"))
    # A second PIN for a token this process is logged in to is refused, not ignored.
    with pytest.raises(BackendUnavailable, match="different PIN"):
        bad.sign(gen.key_ref, pae(b"{}"))


@softhsm_only
def test_unknown_token_is_unavailable(softhsm_token: SoftHSMToken) -> None:
    label = random_label("missing")
    backend = Pkcs11Backend(softhsm_token.module_path, label, softhsm_token.user_pin)
    with pytest.raises(BackendUnavailable) as info:
        backend.generate(random_label())
    message = str(info.value)
    assert f"PKCS#11 token {label!r} not found in module {softhsm_token.module_path}" in message
    assert "SOFTHSM2_CONF" in message
    assert softhsm_token.user_pin not in exception_text(info.value)
    health = backend.health()
    assert not health.ok and "not found" in health.detail
    assert softhsm_token.backend().health().ok  # other tokens are unaffected


@softhsm_only
def test_missing_module_is_unavailable(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    backend = Pkcs11Backend(str(tmp_path / "nope.so"), softhsm_token.token_label, "1234")
    with pytest.raises(BackendUnavailable, match=r"nope\.so does not exist"):
        backend.generate(random_label())
    assert not backend.health().ok


@softhsm_only
def test_recovers_when_the_token_appears(
    softhsm_token: SoftHSMToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    label, so_pin, user_pin = random_label("late"), secrets.token_hex(8), secrets.token_hex(8)
    backend = Pkcs11Backend(softhsm_token.module_path, label, user_pin)
    assert not backend.health().ok
    softhsm.init_token(softhsm_token.conf_path, label, so_pin, user_pin)
    # A missing token makes the module rescan at most every RESCAN_INTERVAL_S per token.
    assert "not found" in backend.health().detail
    monkeypatch.setattr(backend_module, "RESCAN_INTERVAL_S", 0.0)
    assert backend.health().ok
    gen = backend.generate(random_label())
    verify(gen.public_key, backend.sign(gen.key_ref, pae(b"{}")), pae(b"{}"))


@softhsm_only
def test_recovers_after_the_sessions_are_lost(
    pkcs11_backend: Pkcs11Backend, softhsm_token: SoftHSMToken
) -> None:
    gen = pkcs11_backend.generate(random_label())
    verify(gen.public_key, pkcs11_backend.sign(gen.key_ref, pae(b"1")), pae(b"1"))
    # Something finalises the module under the backend (an HSM restart looks the same):
    # every session and handle is gone.
    pkcs11.lib(softhsm_token.module_path).finalize()
    with pytest.raises(BackendUnavailable, match="reconnects on the next call"):
        pkcs11_backend.sign(gen.key_ref, pae(b"2"))
    verify(gen.public_key, pkcs11_backend.sign(gen.key_ref, pae(b"3")), pae(b"3"))
    assert pkcs11_backend.health().ok


# --- concurrency and fork ----------------------------------------------------------------


@softhsm_only
def test_two_threads_sign_concurrently(softhsm_token: SoftHSMToken) -> None:
    # Two tokens, so two sessions: python-pkcs11 serialises operations on one session by
    # itself, but SoftHSM (initialised without locking) crashes on two concurrent sessions.
    backends = [softhsm_token.backend(), softhsm_token.new_token().backend()]
    keys = [b.generate(random_label(), "ECDSA-P256") for b in backends]
    barrier = threading.Barrier(2)
    results: list[list[tuple[bytes, bytes]]] = [[], []]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            for n in range(500):
                message = pae(f"thread {i} message {n}".encode())
                results[i].append((message, backends[i].sign(keys[i].key_ref, message)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        assert len(results[i]) == 500
        for message, der in results[i]:
            verify(keys[i].public_key, der, message)


def _child(
    backend: Pkcs11Backend, key_ref: dict[str, str], queue: Any, bad_conf: bool, inherited: Any
) -> None:
    """Runs in a forked child (``inherited``: the parent's state): report through the queue."""
    report: dict[str, Any] = {"pid": os.getpid()}
    try:
        if bad_conf:
            good = os.environ["SOFTHSM2_CONF"]
            os.environ["SOFTHSM2_CONF"] = "/nonexistent/softhsm2.conf"
            try:
                backend.sign(key_ref, pae(b"child"))
            except KeyBackendError as exc:
                report["bad_conf_error"] = f"{type(exc).__name__}: {exc}"
            os.environ["SOFTHSM2_CONF"] = good
        report["signature"] = backend.sign(key_ref, pae(b"child"))
        state = backend_module._STATE
        report["fresh_state"] = state is not inherited and state.pid == os.getpid()
        report["session_reused"] = any(
            ts.session is old.session
            for ts in state.tokens.values()
            for old in inherited.tokens.values()
        )
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    queue.put(report)


def _run_child(backend: Pkcs11Backend, key_ref: dict[str, str], bad_conf: bool) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    # The fork context hands the child these objects themselves: the parent's state, copied.
    inherited = backend_module._STATE
    assert inherited.tokens, "the parent must hold a live session when it forks"
    process = ctx.Process(target=_child, args=(backend, key_ref, queue, bad_conf, inherited))
    process.start()
    report = queue.get(timeout=60)
    process.join(timeout=60)
    assert process.exitcode == 0
    return report


@softhsm_only
def test_forked_child_signs_with_its_own_session(pkcs11_backend: Pkcs11Backend) -> None:
    gen = pkcs11_backend.generate(random_label())
    # The parent has a live, logged-in session when it forks (the case to survive).
    verify(gen.public_key, pkcs11_backend.sign(gen.key_ref, pae(b"parent")), pae(b"parent"))

    report = _run_child(pkcs11_backend, gen.key_ref, bad_conf=False)

    assert "error" not in report, report["error"]
    assert report["pid"] != os.getpid()
    verify(gen.public_key, report["signature"], pae(b"child"))
    assert report["fresh_state"] is True
    assert report["session_reused"] is False
    # The child's C_Finalize/C_Initialize did not disturb the parent.
    verify(gen.public_key, pkcs11_backend.sign(gen.key_ref, pae(b"after")), pae(b"after"))


@softhsm_only
def test_forked_child_recovers_from_a_bad_module_configuration(
    pkcs11_backend: Pkcs11Backend,
) -> None:
    gen = pkcs11_backend.generate(random_label())
    pkcs11_backend.sign(gen.key_ref, pae(b"parent"))

    report = _run_child(pkcs11_backend, gen.key_ref, bad_conf=True)

    assert "error" not in report, report["error"]
    assert report["bad_conf_error"].startswith("BackendUnavailable: PKCS#11 module")
    assert "SOFTHSM2_CONF" in report["bad_conf_error"]
    verify(gen.public_key, report["signature"], pae(b"child"))
    assert pkcs11_backend.health().ok


def _fork(work: Any) -> dict[str, Any]:
    """``work()`` in a child made by a bare ``os.fork`` (as gunicorn does); its report."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            try:
                report = work()
            except BaseException as exc:
                report = {"error": exception_text(exc)}
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(report, out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pickle.loads(data)  # noqa: S301 - our own child's report


def _sessions() -> list[Any]:
    return [ts.session for ts in backend_module._STATE.tokens.values()]


@softhsm_only
def test_nested_bare_forks_each_open_their_own_session(pkcs11_backend: Pkcs11Backend) -> None:
    # The fork hook, not a per-call pid check, drops inherited state: a child of a child
    # (a worker forking a helper) must drop its parent's fresh state just the same.
    gen = pkcs11_backend.generate(random_label())
    pkcs11_backend.sign(gen.key_ref, pae(b"parent"))
    parent_sessions = _sessions()
    assert parent_sessions

    def sign_here(name: str, inherited: list[Any]) -> dict[str, Any]:
        return {
            "dropped": backend_module._STATE.tokens == {},  # before any call of this process
            "signature": pkcs11_backend.sign(gen.key_ref, pae(name.encode())),
            "reused": any(a is b for a in _sessions() for b in inherited),
        }

    def child() -> dict[str, Any]:
        report = sign_here("child", parent_sessions)
        child_sessions = _sessions()
        report["grandchild"] = _fork(lambda: sign_here("grandchild", child_sessions))
        report["after"] = pkcs11_backend.sign(gen.key_ref, pae(b"child after"))
        return report

    report = _fork(child)

    assert "error" not in report, report["error"]
    grandchild = report["grandchild"]
    assert "error" not in grandchild, grandchild["error"]
    for who, name in ((report, "child"), (grandchild, "grandchild")):
        assert who["dropped"] is True
        assert who["reused"] is False
        verify(gen.public_key, who["signature"], pae(name.encode()))
    verify(gen.public_key, report["after"], pae(b"child after"))
    assert _sessions() == parent_sessions  # the parent kept its session and still signs
    verify(gen.public_key, pkcs11_backend.sign(gen.key_ref, pae(b"after")), pae(b"after"))


def _sign_once(backend: Pkcs11Backend, key_ref: dict[str, str], queue: Any) -> None:
    try:
        queue.put(backend.sign(key_ref, pae(b"worker")))
    except BaseException as exc:
        queue.put(f"{type(exc).__name__}: {exc}")


@softhsm_only
def test_forked_workers_start_at_the_same_time(pkcs11_backend: Pkcs11Backend) -> None:
    # Like gunicorn/Celery workers booting together: each child re-initialises the module and
    # logs in, and a SoftHSM login rewrites token files that the other children are reading.
    gen = pkcs11_backend.generate(random_label())
    pkcs11_backend.sign(gen.key_ref, pae(b"parent"))
    ctx = multiprocessing.get_context("fork")
    for _ in range(4):
        queue = ctx.Queue()
        workers = [
            ctx.Process(target=_sign_once, args=(pkcs11_backend, gen.key_ref, queue))
            for _ in range(4)
        ]
        for w in workers:
            w.start()
        results = [queue.get(timeout=60) for _ in workers]
        for w in workers:
            w.join(timeout=60)
        for result in results:
            assert isinstance(result, bytes), result
            verify(gen.public_key, result, pae(b"worker"))


# --- PIN files (no HSM needed) -----------------------------------------------------------


def _pin_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "user.pin"
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("data", "pin"),
    [(b"1234", "1234"), (b"1234\n", "1234"), (b"12 34\r\n", "12 34"), (b" x\n", " x")],
)
def test_read_pin_file(tmp_path: Path, data: bytes, pin: str) -> None:
    assert read_pin_file(_pin_file(tmp_path, data)) == pin


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"secret\n\n", "line break or NUL"),
        (b"sec\0ret", "line break or NUL"),
        (b"\xffsecret", "not UTF-8"),
        (b"s" * 2000, "larger than"),
    ],
)
def test_read_pin_file_refuses(tmp_path: Path, data: bytes, problem: str) -> None:
    with pytest.raises(BackendUnavailable, match=problem) as info:
        read_pin_file(_pin_file(tmp_path, data))
    assert "secret" not in str(info.value)


def test_read_pin_file_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="cannot read PIN file"):
        read_pin_file(tmp_path / "absent.pin")
    with pytest.raises(BackendUnavailable, match="not a regular file"):
        read_pin_file(tmp_path)


def test_read_pin_file_permissions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _pin_file(tmp_path, b"secret\n", mode=0o644)
    with caplog.at_level(logging.WARNING, logger="keys.backends.pkcs11"):
        assert read_pin_file(path) == "secret"
    assert "accessible by group or other (mode 644)" in caplog.text
    assert "secret" not in caplog.text
    with pytest.raises(BackendUnavailable, match="accessible by group or other"):
        read_pin_file(path, strict=True)
    caplog.clear()
    path.chmod(0o600)
    assert read_pin_file(path, strict=True) == "secret"
    assert not caplog.text
