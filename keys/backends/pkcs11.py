"""PKCS#11 key backend (SPEC sections 5, 6, 9): keys are generated and used inside an HSM.

Process model, from facts measured with python-pkcs11 0.10.1 and SoftHSM 2.6.1:

* python-pkcs11 calls ``C_Initialize(NULL)``, so the module may run without internal
  locking: one process-wide re-entrant lock (``_LOCK``) is held around every PKCS#11 call.
* Login is per process, and closing the session that logged in logs out every session:
  the process keeps one logged-in read/write session per token for its whole life.
* Key lookups are slow: handles are cached per (module, token, CKA_ID), with the key's
  public half and checked attributes. A key is checked once per process when its handle
  is first loaded (SENSITIVE/EXTRACTABLE can only ever be tightened, so that is sound)
  and again on every explicit :meth:`Pkcs11Backend.check_usable`.
* SoftHSM has no CKM_ECDSA_SHA256: the PAE is hashed here (SHA-256 for P-256, SHA-384 for
  P-384, SHA-512 for P-521) and the digest is signed with CKM_ECDSA.
* Tokens are found by label, never by slot number.

Fork safety: gunicorn and Celery fork. A child must never use the parent's sessions or
handles. SoftHSM 2.6.1 has no fork detection (a child's ``C_Initialize`` answers
CKR_CRYPTOKI_ALREADY_INITIALIZED and the parent's sessions keep "working" on a copy of
the parent's memory), so a child that inherited an initialised module calls
``C_Finalize`` then ``C_Initialize`` before its first call; modules that do detect forks
answer the ``C_Finalize`` with CKR_CRYPTOKI_NOT_INITIALIZED, which is ignored. The
parent is unaffected (measured). The inherited state is dropped by an
``os.register_at_fork`` hook in the child, before any Python code of the child runs: every
``os.fork`` (gunicorn, Celery's billiard, multiprocessing's fork context) calls it, so the
signing path needs no per-call pid check (``os.getpid()`` is a system call, 0.7 us of a
signature's 15 us of bookkeeping here). Best practice is still for the parent never to
touch PKCS#11 (open it in ``worker_process_init`` / post-fork).

Several processes on one SoftHSM token directory race: a login rewrites token files, so
another process initialising at that moment may not see the token or may get
GeneralError (measured: about 1 child in 4 when four forked workers start together).
Opening a token is therefore tried ``OPEN_ATTEMPTS`` times, re-initialising in between;
that also finds tokens created after the module was initialised.

Failures: module, token, PIN, session and device problems raise ``BackendUnavailable``;
after a PKCS#11 error the process state is reset (``C_Finalize``) so the next call starts
from scratch. A wrong PIN is not retried with the same PIN for ``pin_retry_after``
seconds (HSMs lock PINs). A missing or unacceptable key raises ``KeyNotUsable``.
Messages never contain the PIN.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pkcs11
from asn1crypto.core import OctetString
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from keys.backends.base import (
    BackendUnavailable,
    GeneratedKey,
    Health,
    KeyBackend,
    KeyBackendError,
    KeyNotUsable,
    KeyRef,
)
from signing_service.bundle import BundleError, raw_ecdsa_to_der, raw_to_der

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: A rejected PIN is not retried for this long (per process and token): real HSMs lock
#: the user PIN after a few wrong attempts, and a worker retrying per request would do it.
PIN_RETRY_AFTER_S = 300.0
#: Opening a token (find by label, log in) is tried this often, re-initialising the module
#: in between: SoftHSM finds new tokens only in C_Initialize, and processes racing on the
#: same token directory see transient errors.
OPEN_ATTEMPTS = 3
OPEN_RETRY_DELAY_S = 0.05
#: After a token was found missing, calls within this time look it up once, without
#: re-initialising the module (which would log out the process's other tokens).
RESCAN_INTERVAL_S = 5.0
#: Largest PIN file accepted by :func:`read_pin_file`.
MAX_PIN_FILE_BYTES = 1024
_FORK_LOCK_TIMEOUT_S = 30.0
_MAX_CACHED_REFS = 1024
_ECDSA = Mechanism.ECDSA


# --- curves ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Curve:
    algorithm: str
    name: str
    ec_curve: type[ec.EllipticCurve]
    hash_fn: Callable[[bytes], Any]  # hashlib constructor: the fastest way to hash the PAE
    hash_cls: type[hashes.HashAlgorithm]
    size: int  # bytes of r and of s in a raw signature

    @property
    def params(self) -> bytes:
        return encode_named_curve_parameters(self.name)


_CURVES: dict[str, _Curve] = {
    c.algorithm: c
    for c in (
        _Curve("ECDSA-P256", "secp256r1", ec.SECP256R1, hashlib.sha256, hashes.SHA256, 32),
        _Curve("ECDSA-P384", "secp384r1", ec.SECP384R1, hashlib.sha384, hashes.SHA384, 48),
        _Curve("ECDSA-P521", "secp521r1", ec.SECP521R1, hashlib.sha512, hashes.SHA512, 66),
    )
}
_CURVE_BY_PARAMS: dict[bytes, _Curve] = {c.params: c for c in _CURVES.values()}


def _curve_for(algorithm: str) -> _Curve:
    try:
        return _CURVES[algorithm]
    except KeyError:
        raise KeyNotUsable(
            f"unsupported algorithm {algorithm!r}; use one of {', '.join(_CURVES)}"
        ) from None


# --- process-wide state ------------------------------------------------------------------


class _Pin:
    """Holds the PIN so that reprs, tracebacks and debug pages never show it."""

    __slots__ = ("_value", "digest")

    def __init__(self, value: str) -> None:
        self._value = value
        self.digest = hashlib.sha256(_PIN_SALT + value.encode("utf-8")).digest()

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<PIN hidden>"


@dataclass(frozen=True)
class _KeyId:
    token: str
    label: str
    id: bytes

    def as_ref(self) -> KeyRef:
        return {"token": self.token, "label": self.label, "id": self.id.hex()}

    def describe(self) -> str:
        return f"key {self.label!r} (id {self.id.hex()}) on token {self.token!r}"


@dataclass(frozen=True)
class _KeyHandle:
    label: str
    private: Any  # pkcs11 PrivateKey bound to the token's long-lived session
    public_key: ec.EllipticCurvePublicKey
    curve: _Curve
    attributes: dict[str, Any]


@dataclass
class _TokenState:
    token: Any
    session: Any
    pin_digest: bytes
    keys: dict[bytes, _KeyHandle] = field(default_factory=dict)


@dataclass
class _ProcessState:
    pid: int = field(default_factory=os.getpid)
    libs: dict[str, Any] = field(default_factory=dict)
    tokens: dict[tuple[str, str], _TokenState] = field(default_factory=dict)
    # Kept across resets (not across forks): (module, token) -> (PIN digest, when).
    rejected_pins: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)
    # Kept across resets: (module, token) -> when the token was last found missing.
    missing: dict[tuple[str, str], float] = field(default_factory=dict)


_PIN_SALT = secrets.token_bytes(16)
_LOCK = threading.RLock()
_STATE = _ProcessState()
#: Module paths whose initialised library state was copied from a parent by fork.
_INHERITED_MODULES: set[str] = set()
_fork_lock_held = False


def _before_fork() -> None:
    # Fork only between PKCS#11 calls, so the child's copy of the module's memory (which
    # the child finalises) is consistent.
    global _fork_lock_held
    _fork_lock_held = _LOCK.acquire(timeout=_FORK_LOCK_TIMEOUT_S)


def _after_fork_parent() -> None:
    global _fork_lock_held
    if _fork_lock_held:
        _fork_lock_held = False
        _LOCK.release()


def _after_fork_child() -> None:
    global _LOCK, _STATE, _fork_lock_held
    _LOCK = threading.RLock()
    _fork_lock_held = False
    # Never close the parent's sessions from here: forget them, and re-initialise each
    # inherited module before its first use in this process.
    _INHERITED_MODULES.update(_STATE.libs)
    # Libraries loaded by other code in the parent are just as stale here.
    _INHERITED_MODULES.update(getattr(pkcs11, "_loaded", {}))
    _STATE = _ProcessState()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child
)


def _state() -> _ProcessState:
    """This process's state (a forked child's was replaced by ``_after_fork_child``)."""
    return _STATE


def reset_process_state() -> None:
    """Log out and forget every session and key handle of this process (``C_Finalize``).

    The next call of any backend starts from scratch and the module re-reads its
    configuration (for SoftHSM, ``SOFTHSM2_CONF`` and the token directory). For tests and
    admin tools; backends call it themselves after a failure.
    """
    with _LOCK:
        _reset()


def _reset() -> None:
    global _STATE
    old = _state()
    for lib in old.libs.values():
        _finalize_quietly(lib)
    _STATE = _ProcessState(rejected_pins=old.rejected_pins, missing=old.missing)


def _finalize_quietly(lib: Any) -> None:
    # Logs out and closes every session; python-pkcs11 then re-initialises on next use.
    try:
        lib.finalize()
    except p11e.PKCS11Error:
        pass


def _library(path: str) -> Any:
    st = _state()
    lib = st.libs.get(path)
    if lib is None:
        lib = _load_library(path)
        st.libs[path] = lib
    return lib


def _load_library(path: str) -> Any:
    try:
        lib = pkcs11.lib(path)  # python-pkcs11 keeps one object per path per process
        if path in _INHERITED_MODULES:
            _INHERITED_MODULES.discard(path)
            _finalize_quietly(lib)
            lib.initialize()
    except p11e.PKCS11Error as exc:
        raise BackendUnavailable(_module_error(path, exc)) from None
    return lib


def _module_error(path: str, exc: p11e.PKCS11Error) -> str:
    if not Path(path).exists():
        return f"PKCS#11 module {path} does not exist"
    if isinstance(exc, p11e.GeneralError):
        return f"PKCS#11 module {path} failed to initialise (GeneralError){_conf_hint(path)}"
    return f"cannot load PKCS#11 module {path}: {_describe(exc)}"


def _conf_hint(path: str) -> str:
    if "softhsm" not in path.lower():
        return ""
    conf = os.environ.get("SOFTHSM2_CONF")
    return f"; check SOFTHSM2_CONF (currently {conf!r})" if conf else "; SOFTHSM2_CONF is unset"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the backend -------------------------------------------------------------------------

_PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DERIVE: False,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
}
_MUST_BE_TRUE = (
    Attribute.SENSITIVE,
    Attribute.ALWAYS_SENSITIVE,
    Attribute.NEVER_EXTRACTABLE,
    Attribute.LOCAL,
    Attribute.SIGN,
)
_MUST_BE_FALSE = (Attribute.EXTRACTABLE,)
_OPTIONAL_FALSE = (Attribute.ALWAYS_AUTHENTICATE,)  # we cannot re-enter the PIN per signature
_AUDITED = (
    Attribute.CLASS,
    Attribute.KEY_TYPE,
    Attribute.EC_PARAMS,
    Attribute.ID,
    Attribute.LABEL,
    Attribute.TOKEN,
    Attribute.PRIVATE,
    *_MUST_BE_TRUE,
    *_MUST_BE_FALSE,
    *_OPTIONAL_FALSE,
)


class _TokenMissing(BackendUnavailable):
    """The token is not in the module's slot list (yet)."""


#: Errors a SoftHSM token shows transiently while another process rewrites its files.
_TRANSIENT = (
    p11e.GeneralError,
    p11e.FunctionFailed,
    p11e.DeviceError,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
)


class Pkcs11Backend(KeyBackend):
    """Keys on one token of one PKCS#11 module, addressed by token label."""

    name = "pkcs11"

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin: str,
        *,
        pin_retry_after: float = PIN_RETRY_AFTER_S,
    ) -> None:
        if not module_path or not token_label:
            raise ValueError("module_path and token_label are required")
        if not pin:
            raise ValueError("the token's user PIN is required")
        self.module_path = module_path
        self.token_label = token_label
        self._pin = _Pin(pin)
        self._pin_retry_after = pin_retry_after
        self._token_key = (module_path, token_label)
        self._refs: dict[tuple[Any, Any, Any], _KeyId] = {}
        #: CKA_ID -> curve, read without the lock so the PAE is hashed before taking it.
        self._curves: dict[bytes, _Curve] = {}

    def __repr__(self) -> str:
        return f"Pkcs11Backend(module_path={self.module_path!r}, token_label={self.token_label!r})"

    # -- public API ---------------------------------------------------------------------

    def generate(self, label: str, algorithm: str = "ECDSA-P256") -> GeneratedKey:
        """Generate a non-extractable EC key pair on the token; refuse a label in use."""
        curve = _curve_for(algorithm)
        if not label or not label.isprintable():
            raise KeyNotUsable(f"key label must be non-empty and printable: {label!r}")
        return self._call(lambda: self._generate(label, curve))

    def public_key(self, key_ref: KeyRef) -> ec.EllipticCurvePublicKey:
        kid = self._parse_ref(key_ref)
        return self._call(lambda: self._key(kid).public_key)

    def check_usable(self, key_ref: KeyRef) -> dict[str, Any]:
        """Re-read and check the key's attributes on the token; return them for the audit."""
        kid = self._parse_ref(key_ref)
        return self._call(lambda: dict(self._reload_key(kid).attributes))

    def sign(self, key_ref: KeyRef, pae_bytes: bytes) -> bytes:
        # The hot path, kept flat (each call or lookup here is measurable against C_Sign):
        # hash and DER-encode outside the lock, hold it for the handle lookup and C_Sign.
        kid = self._parse_ref(key_ref)
        curve = self._curves.get(kid.id)  # a hint, checked again under the lock
        if curve is None:
            curve = self._curves[kid.id] = self._call(lambda: self._key(kid).curve)
        # Hash outside the lock: a large PAE must not stall other threads' signatures.
        digest = curve.hash_fn(pae_bytes).digest()
        with _LOCK:
            try:
                handle = self._key(kid)
                if handle.curve is not curve:  # stale hint: this id now names another key
                    curve = self._curves[kid.id] = handle.curve
                    digest = curve.hash_fn(pae_bytes).digest()
                raw = handle.private.sign(digest, mechanism=_ECDSA)
            except KeyBackendError:
                raise
            except p11e.PKCS11Error as exc:
                raise self._failed(exc) from None
        try:
            return raw_ecdsa_to_der(raw, curve.size)
        except BundleError as exc:
            raise BackendUnavailable(
                f"token {kid.token!r} returned a bad signature: {exc}"
            ) from None

    def destroy(self, key_ref: KeyRef) -> dict[str, Any]:
        """C_DestroyObject on the private key (and its public half); forget the handle."""
        kid = self._parse_ref(key_ref)
        return self._call(self._destroy, kid)

    def _destroy(self, kid: _KeyId) -> dict[str, Any]:
        ts = self._token_state()
        ts.keys.pop(kid.id, None)
        self._curves.pop(kid.id, None)
        private = _find_key(ts.session, ObjectClass.PRIVATE_KEY, kid)
        destroyed = {"token": kid.token, "label": kid.label, "id": kid.id.hex(), "private": True}
        private.destroy()
        try:
            _find_key(ts.session, ObjectClass.PUBLIC_KEY, kid).destroy()
            destroyed["public"] = True
        except KeyNotUsable:
            destroyed["public"] = False  # already gone; the private half is what matters
        return destroyed

    def health(self) -> Health:
        try:
            return self._call(self._health)
        except KeyBackendError as exc:
            return Health(ok=False, detail=str(exc))
        except Exception as exc:  # health() is polled by monitoring and must never raise
            return Health(ok=False, detail=f"unexpected error: {_describe(exc)}")

    # -- error mapping ------------------------------------------------------------------

    def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        with _LOCK:
            try:
                return fn(*args, **kwargs)
            except KeyBackendError:
                raise
            except p11e.PKCS11Error as exc:
                raise self._failed(exc) from None

    def _failed(self, exc: p11e.PKCS11Error) -> BackendUnavailable:
        """Reset the process state after a PKCS#11 error (under the lock); say what failed."""
        _reset()
        return BackendUnavailable(
            f"PKCS#11 call on token {self.token_label!r} failed ({_describe(exc)}); "
            "the backend reconnects on the next call"
        )

    # -- token and session --------------------------------------------------------------

    def _token_state(self) -> _TokenState:
        ts = _state().tokens.get(self._token_key)
        if ts is None:
            ts = self._open_token()
            _state().tokens[self._token_key] = ts
        elif ts.pin_digest != self._pin.digest:
            raise BackendUnavailable(
                f"token {self.token_label!r} is already logged in in this process with a "
                "different PIN; PKCS#11 login is per process: restart it after a PIN change"
            )
        return ts

    def _open_token(self) -> _TokenState:
        self._refuse_rejected_pin()
        # A token that was missing a moment ago gets one plain lookup: each re-initialisation
        # below logs out every other token of the process too.
        attempts = 1 if self._missing_recently() else OPEN_ATTEMPTS
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                # SoftHSM reads its token directory only in C_Initialize, and a process
                # logging in rewrites the token's files, so a concurrent reader may miss the
                # token or get GeneralError: start over after a short pause.
                _reset()
                time.sleep(OPEN_RETRY_DELAY_S * attempt)
            try:
                ts = self._try_open_token()
            except (_TokenMissing, *_TRANSIENT) as exc:
                last = exc
                continue
            _state().missing.pop(self._token_key, None)
            return ts
        if isinstance(last, _TokenMissing):
            _state().missing[self._token_key] = time.monotonic()
        assert last is not None
        raise last

    def _try_open_token(self) -> _TokenState:
        token = self._find_token(_library(self.module_path))
        self._check_token_flags(token)
        session = self._login(token)
        return _TokenState(token=token, session=session, pin_digest=self._pin.digest)

    def _find_token(self, lib: Any) -> Any:
        try:
            return lib.get_token(token_label=self.token_label)
        except p11e.NoSuchToken:
            raise _TokenMissing(self._token_missing(lib)) from None
        except p11e.MultipleTokensReturned:
            raise BackendUnavailable(
                f"more than one PKCS#11 token is labelled {self.token_label!r} in module "
                f"{self.module_path}; token labels must be unique"
            ) from None

    def _missing_recently(self) -> bool:
        since = time.monotonic() - _state().missing.get(self._token_key, float("-inf"))
        return since < RESCAN_INTERVAL_S

    def _token_missing(self, lib: Any) -> str:
        try:
            labels = sorted(t.label for t in lib.get_tokens() if t.label)
        except p11e.PKCS11Error:
            labels = []
        present = ", ".join(repr(label) for label in labels[:10]) or "none"
        return (
            f"PKCS#11 token {self.token_label!r} not found in module {self.module_path} "
            f"(tokens present: {present}){_conf_hint(self.module_path)}"
        )

    def _check_token_flags(self, token: Any) -> None:
        flags = token.flags
        if flags & TokenFlag.USER_PIN_LOCKED:
            raise BackendUnavailable(
                f"the user PIN of token {self.token_label!r} is locked; the security officer "
                "must reset it"
            )
        if not flags & TokenFlag.USER_PIN_INITIALIZED:
            raise BackendUnavailable(f"token {self.token_label!r} has no user PIN set")

    def _login(self, token: Any) -> Any:
        label = self.token_label
        try:
            # Passed inline so no frame holds the PIN in a local variable.
            return token.open(rw=True, user_pin=self._pin.reveal())
        except p11e.PinIncorrect:
            key = (self.module_path, label)
            _state().rejected_pins[key] = (self._pin.digest, time.monotonic())
            raise BackendUnavailable(f"PIN for token {label!r} was rejected") from None
        except p11e.PinLocked:
            raise BackendUnavailable(f"the user PIN of token {label!r} is locked") from None
        except p11e.PinExpired:
            raise BackendUnavailable(f"the user PIN of token {label!r} has expired") from None
        except (p11e.PinInvalid, p11e.PinLenRange):
            raise BackendUnavailable(
                f"PIN for token {label!r} has an invalid format or length"
            ) from None
        except p11e.UserPinNotInitialized:
            raise BackendUnavailable(f"token {label!r} has no user PIN set") from None
        except p11e.UserAlreadyLoggedIn:
            raise BackendUnavailable(
                f"token {label!r} is already logged in by other code in this process; "
                "route every PKCS#11 use through Pkcs11Backend"
            ) from None

    def _refuse_rejected_pin(self) -> None:
        rejected = _state().rejected_pins.get((self.module_path, self.token_label))
        if rejected is None or rejected[0] != self._pin.digest:
            return
        age = time.monotonic() - rejected[1]
        if age < self._pin_retry_after:
            raise BackendUnavailable(
                f"PIN for token {self.token_label!r} was rejected {age:.0f}s ago; the same "
                f"PIN is not retried for {self._pin_retry_after:.0f}s so as not to lock the "
                "token"
            )

    # -- keys ---------------------------------------------------------------------------

    def _parse_ref(self, key_ref: KeyRef) -> _KeyId:
        if type(key_ref) is not dict and not isinstance(key_ref, Mapping):  # ABC check is slow
            raise KeyNotUsable("key_ref must be a mapping with token, label and id")
        token, label, id_hex = key_ref.get("token"), key_ref.get("label"), key_ref.get("id")
        cache_key = (token, label, id_hex)
        try:
            return self._refs[cache_key]  # parsing costs as much as the rest of sign()
        except (KeyError, TypeError):
            pass
        kid = self._parse_fields(token, label, id_hex)
        if len(self._refs) >= _MAX_CACHED_REFS:
            self._refs.clear()
        self._refs[cache_key] = kid
        return kid

    def _parse_fields(self, token: Any, label: Any, id_hex: Any) -> _KeyId:
        if token != self.token_label:
            raise KeyNotUsable(
                f"key_ref is for token {token!r}; this backend uses {self.token_label!r}"
            )
        if not isinstance(label, str) or not label:
            raise KeyNotUsable("key_ref has no label")
        try:
            key_id = bytes.fromhex(id_hex) if isinstance(id_hex, str) else b""
        except ValueError:
            key_id = b""
        if not key_id:
            raise KeyNotUsable(f"key_ref id must be non-empty hex, got {id_hex!r}")
        return _KeyId(token=self.token_label, label=label, id=key_id)

    def _key(self, kid: _KeyId) -> _KeyHandle:
        # The hot path of every signature: plain lookups first, the general path otherwise.
        ts = _STATE.tokens.get(self._token_key)
        if ts is None or ts.pin_digest != self._pin.digest:
            ts = self._token_state()
        handle = ts.keys.get(kid.id)
        if handle is None or handle.label != kid.label:
            handle = self._load_key(ts, kid)
        return handle

    def _reload_key(self, kid: _KeyId) -> _KeyHandle:
        ts = self._token_state()
        ts.keys.pop(kid.id, None)
        return self._load_key(ts, kid)

    def _load_key(self, ts: _TokenState, kid: _KeyId) -> _KeyHandle:
        private = _find_key(ts.session, ObjectClass.PRIVATE_KEY, kid)
        attributes, curve = _check_attributes(private, kid)
        public_key = _read_public_key(ts.session, kid, curve)
        _pairwise_check(private, public_key, curve, kid)
        attributes.update(_token_facts(ts.token))
        attributes["pairwise_check"] = True
        handle = _KeyHandle(kid.label, private, public_key, curve, attributes)
        ts.keys[kid.id] = handle
        return handle

    def _generate(self, label: str, curve: _Curve) -> GeneratedKey:
        ts = self._token_state()
        if list(ts.session.get_objects({Attribute.LABEL: label})):
            raise KeyNotUsable(
                f"a key labelled {label!r} already exists on token {ts.token.label!r}"
            )
        kid = _KeyId(token=self.token_label, label=label, id=secrets.token_bytes(16))
        public, private = ts.session.generate_keypair(
            KeyType.EC,
            id=kid.id,
            label=label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            public_template={
                Attribute.EC_PARAMS: curve.params,
                Attribute.TOKEN: True,
                Attribute.VERIFY: True,
            },
            private_template=_PRIVATE_TEMPLATE,
        )
        try:
            handle = self._load_key(ts, kid)
        except BaseException:
            # An aborted generation must leave no key behind that someone could adopt.
            _destroy_quietly(private, public)
            raise
        return GeneratedKey(
            key_ref=kid.as_ref(), public_key=handle.public_key, attributes=dict(handle.attributes)
        )

    def _health(self) -> Health:
        ts = self._token_state()
        info = ts.token.slot.get_token()  # fresh C_GetTokenInfo: token still there?
        self._check_token_flags(info)
        # A search round trip proves the long-lived session still works.
        list(
            ts.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: b"\0"})
        )
        notes = ""
        if info.flags & (TokenFlag.USER_PIN_COUNT_LOW | TokenFlag.USER_PIN_FINAL_TRY):
            notes = "; warning: recent wrong user PIN attempts on this token"
        return Health(
            ok=True,
            detail=f"token {self.token_label!r} logged in, {len(ts.keys)} key(s) cached{notes}",
        )


# --- key helpers -------------------------------------------------------------------------


def _find_key(session: Any, object_class: ObjectClass, kid: _KeyId) -> Any:
    what = "private" if object_class == ObjectClass.PRIVATE_KEY else "public"
    try:
        key = session.get_key(object_class=object_class, id=kid.id)
    except p11e.NoSuchKey:
        raise KeyNotUsable(f"no {what} key with id {kid.id.hex()} on token {kid.token!r}") from None
    except p11e.MultipleObjectsReturned:
        raise KeyNotUsable(
            f"several {what} keys have id {kid.id.hex()} on token {kid.token!r}"
        ) from None
    if key.label != kid.label:
        raise KeyNotUsable(
            f"the {what} key with id {kid.id.hex()} on token {kid.token!r} is labelled "
            f"{key.label!r}, not {kid.label!r}"
        )
    return key


def _check_attributes(private: Any, kid: _KeyId) -> tuple[dict[str, Any], _Curve]:
    """Return the audited attributes, or raise naming every attribute that fails."""
    raw = private.get_attributes(list(_AUDITED))  # unreadable attributes are left out
    problems: list[str] = []
    for attr in _MUST_BE_TRUE:
        if raw.get(attr) is not True:
            problems.append(_attr_problem(attr, raw, want=True))
    for attr in _MUST_BE_FALSE:
        if raw.get(attr) is not False:
            problems.append(_attr_problem(attr, raw, want=False))
    for attr in _OPTIONAL_FALSE:
        if raw.get(attr) is True:
            problems.append(f"{attr.name} is true (must be false)")
    if raw.get(Attribute.KEY_TYPE) != KeyType.EC:
        problems.append(f"KEY_TYPE is {_name(raw.get(Attribute.KEY_TYPE))} (must be EC)")
    curve = _CURVE_BY_PARAMS.get(raw.get(Attribute.EC_PARAMS, b""))
    if curve is None and raw.get(Attribute.KEY_TYPE) == KeyType.EC:
        problems.append("EC_PARAMS is not a supported named curve (P-256, P-384, P-521)")
    if problems or curve is None:
        raise KeyNotUsable(f"{kid.describe()} is not usable: {'; '.join(problems)}")
    return _audit_view(raw, curve), curve


def _attr_problem(attr: Attribute, raw: dict[Attribute, Any], *, want: bool) -> str:
    if attr not in raw:
        return f"{attr.name} is not reported by the token (must be {str(want).lower()})"
    return f"{attr.name} is {str(raw[attr]).lower()} (must be {str(want).lower()})"


def _name(value: Any) -> str:
    return getattr(value, "name", None) or repr(value)


def _audit_view(raw: dict[Attribute, Any], curve: _Curve) -> dict[str, Any]:
    """JSON-ready attributes for the audit transcript (``CKA_`` names, hex bytes)."""
    view: dict[str, Any] = {}
    for attr, value in raw.items():
        if attr == Attribute.EC_PARAMS:
            continue  # shown as "curve"
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, enum.Enum):
            value = value.name
        view[f"CKA_{Attribute(attr).name}"] = value
    view["curve"] = curve.name
    return view


def _token_facts(token: Any) -> dict[str, Any]:
    serial = token.serial
    return {
        "token_label": token.label,
        "token_serial": serial.decode("ascii", "replace") if isinstance(serial, bytes) else serial,
        "token_manufacturer": token.manufacturer_id,
        "token_model": token.model,
    }


def _read_public_key(session: Any, kid: _KeyId, curve: _Curve) -> ec.EllipticCurvePublicKey:
    public = _find_key(session, ObjectClass.PUBLIC_KEY, kid)
    attrs = public.get_attributes([Attribute.EC_PARAMS, Attribute.EC_POINT])
    if attrs.get(Attribute.EC_PARAMS) != curve.params:
        raise KeyNotUsable(f"the public key of {kid.describe()} is on another curve")
    point = _ec_point(attrs.get(Attribute.EC_POINT, b""), curve)
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve.ec_curve(), point)
    except ValueError:
        raise KeyNotUsable(f"the public key of {kid.describe()} is not a valid point") from None


def _ec_point(value: bytes, curve: _Curve) -> bytes:
    # PKCS#11 says CKA_EC_POINT is a DER OCTET STRING; some modules return the raw point.
    if len(value) == 1 + 2 * curve.size and value[0] == 0x04:
        return value
    try:
        return bytes(OctetString.load(value, strict=True).native)
    except ValueError:
        return value


def _pairwise_check(
    private: Any, public_key: ec.EllipticCurvePublicKey, curve: _Curve, kid: _KeyId
) -> None:
    """Prove the public key we publish belongs to the private key that will sign."""
    digest = secrets.token_bytes(curve.hash_fn(b"").digest_size)
    raw = private.sign(digest, mechanism=Mechanism.ECDSA)
    try:
        der = raw_to_der(raw, public_key)
        public_key.verify(der, digest, ec.ECDSA(Prehashed(curve.hash_cls())))
    except (BundleError, InvalidSignature):
        raise KeyNotUsable(
            f"the public key object of {kid.describe()} does not match its private key"
        ) from None


def _destroy_quietly(*objects: Any) -> None:
    for obj in objects:
        try:
            obj.destroy()
        except p11e.PKCS11Error:
            logger.warning("could not destroy a rejected key object %r", obj)


# --- PIN files ---------------------------------------------------------------------------


def read_pin_file(path: str | os.PathLike[str], *, strict: bool = False) -> str:
    """Read a token PIN from a file; strip one trailing newline.

    Refused (``BackendUnavailable``, message without the PIN): a missing or unreadable
    file, a non-regular file, an empty PIN, a file over :data:`MAX_PIN_FILE_BYTES`, a PIN
    that is not UTF-8 or contains a line break or NUL (a second trailing newline would
    otherwise silently become part of the PIN).

    A file that group or other may read or write is refused only when ``strict``; by
    default it is logged as a warning, because Kubernetes and Docker mount secrets 0644
    or 0444 by default and refusing those would push operators to PINs in environment
    variables, which leak more easily (``/proc/PID/environ``, crash reports).
    """
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise BackendUnavailable(f"PIN file {p} is not a regular file")
        if st.st_size > MAX_PIN_FILE_BYTES:
            raise BackendUnavailable(f"PIN file {p} is larger than {MAX_PIN_FILE_BYTES} bytes")
        data = p.read_bytes()
    except OSError as exc:
        raise BackendUnavailable(f"cannot read PIN file {p}: {exc.strerror}") from None
    _check_pin_file_mode(p, st.st_mode, strict=strict)
    return _parse_pin(p, data)


def _check_pin_file_mode(p: Path, mode: int, *, strict: bool) -> None:
    if not mode & 0o077:
        return
    message = f"PIN file {p} is accessible by group or other (mode {stat.S_IMODE(mode):o})"
    if strict:
        raise BackendUnavailable(message)
    logger.warning("%s; chmod 600 it", message)


def _parse_pin(p: Path, data: bytes) -> str:
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        pin = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BackendUnavailable(f"PIN file {p} is not UTF-8") from None
    if not pin:
        raise BackendUnavailable(f"PIN file {p} is empty")
    if any(c in pin for c in "\r\n\0"):
        raise BackendUnavailable(f"PIN file {p} contains a line break or NUL inside the PIN")
    return pin
