"""Sigstore keyless signing for ``type: keyless, provider: sigstore`` authorities (SPEC 9).

The caller's OIDC identity token is exchanged at Fulcio for a short-lived certificate
bound to an ephemeral P-256 key; the in-toto statement is signed as a DSSE envelope and
logged in Rekor. The result is a Sigstore bundle v0.3 (certificate + transparency-log
entry) that ``model_signing verify sigstore --identity ... --identity_provider ...``
accepts. We use the same sigstore API as model_signing's own Sigstore signer
(``ClientTrustConfig`` -> ``SigningContext`` -> ``signer(token).sign_dsse``).

Why not a :class:`~keys.backends.base.KeyBackend`: that interface signs with a stored,
long-lived ``key_ref`` and exposes its public key. Keyless signing has neither: the key
lives for one signing call, its certificate comes from the caller's token, and the
certificate and log entry must go into the bundle, so the unit of work is "statement +
token -> bundle", not "PAE bytes -> signature". We reuse the error types and
:class:`~keys.backends.base.Health` so callers handle failures the same way.

Error mapping: token problems (malformed, expired, wrong audience, missing claim) raise
:class:`IdentityTokenError` (a ``KeyNotUsable``) before any network call; anything about
reaching or talking to Fulcio, Rekor or the TUF repository raises ``BackendUnavailable``
naming the service and URL. HTTP calls get a bounded timeout and no retries.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography import x509
from requests.adapters import HTTPAdapter
from sigstore import dsse as sigstore_dsse
from sigstore import oidc as sigstore_oidc
from sigstore._internal.fulcio.client import ExpiredCertificate, FulcioClientError
from sigstore._internal.rekor import RekorClientError
from sigstore.errors import Error as SigstoreError
from sigstore.models import ClientTrustConfig
from sigstore.sign import Signer, SigningContext

from keys.backends.base import BackendUnavailable, Health, KeyNotUsable
from signing_service.bundle import statement_payload  # Django-free module

#: The audience Fulcio expects (``sigstore``), as model_signing and sigstore default to.
DEFAULT_CLIENT_ID = "sigstore"
PUBLIC_GOOD_TUF = "https://tuf-repo-cdn.sigstore.dev"
STAGING_TUF = "https://tuf-repo-cdn.sigstage.dev"
GITHUB_ACTIONS_ISSUER = "https://token.actions.githubusercontent.com"
#: Fulcio puts ``https://github.com/<job_workflow_ref>`` in the certificate SAN for
#: GitHub Actions tokens; that, not ``sub``, is what verifiers match.
_GITHUB_BASE = "https://github.com/"
#: Fulcio's own OIDC issuer extension (1.3.6.1.4.1.57264.1.8 = Issuer V2).
_OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
_OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")


class IdentityTokenError(KeyNotUsable):
    """The OIDC identity token cannot be used; the message names the problem."""


class IdentityNotAllowed(KeyNotUsable):
    """The token's identity matches none of the authority's ``allowed_identities``."""


class TrustConfigError(BackendUnavailable):
    """The trust config file is missing or invalid: no Sigstore instance to sign with."""


class _TimeoutAdapter(HTTPAdapter):
    """Adds a default (connect, read) timeout and disables retries.

    sigstore 4.5.1 posts to Fulcio and Rekor with no timeout at all, so a black-holed
    service would hang a worker forever; a signing request must rather fail and retry
    later under the caller's control.
    """

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__(max_retries=0)
        self._timeout = timeout

    def send(self, request: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().send(request, **kwargs)


def _bound(session: requests.Session, timeout: tuple[float, float]) -> None:
    adapter = _TimeoutAdapter(timeout)
    session.mount("https://", adapter)
    session.mount("http://", adapter)


class SigstoreKeylessSigner:
    """Sign in-toto statements with a Fulcio certificate for the caller's identity.

    ``trust_config_path``: a sigstore ``ClientTrustConfig`` JSON (model_signing's
    ``--trust_config``) for a private instance; read and validated here, offline.
    Without it the public-good instance (or its staging twin with ``staging=True``) is
    used, and its trust config is fetched from Sigstore's TUF repository at first sign.
    """

    name = "sigstore"

    def __init__(
        self,
        trust_config_path: str | None = None,
        *,
        staging: bool = False,
        client_id: str = DEFAULT_CLIENT_ID,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        if trust_config_path and staging:
            raise ValueError("give either trust_config_path or staging=True, not both")
        self._path = trust_config_path
        self._staging = staging
        self._client_id = client_id
        self._timeout = (connect_timeout, read_timeout)
        self._lock = threading.Lock()
        self._trust_config: ClientTrustConfig | None = None
        self._context: SigningContext | None = None
        if trust_config_path:
            # A private instance is fully described by the file: load it now so a bad
            # file stops start-up instead of the first signing request.
            self._trust_config = load_trust_config(trust_config_path)
            self._context = _context_from(self._trust_config, self._timeout)

    # --- identity ----------------------------------------------------------------

    def identity_of(self, identity_token: str) -> tuple[str, str]:
        """``(identity, issuer)`` the Fulcio certificate will carry, from the token.

        No network and no signature check: the service verifies the token itself (or
        Fulcio does); this only reads the claims so the identity can be matched against
        ``allowed_identities`` before anything is sent out.
        """
        return _identity(self._parse(identity_token))

    def _parse(self, identity_token: str) -> sigstore_oidc.IdentityToken:
        try:
            return sigstore_oidc.IdentityToken(identity_token, self._client_id)
        except sigstore_oidc.IdentityError as exc:
            raise IdentityTokenError(_token_problem(exc, self._client_id)) from None

    # --- signing -----------------------------------------------------------------

    def sign_statement(
        self,
        statement: Mapping[str, Any],
        identity_token: str,
        *,
        allowed_identities: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Sign ``statement`` as DSSE with a Fulcio certificate; return the bundle JSON.

        The signed payload is exactly :func:`signing_service.bundle.statement_payload`
        of the statement, so its SHA-256 is the digest approvals are bound to.
        ``allowed_identities`` (globs) is checked again here, before any network call,
        as defence in depth for callers that forgot to.
        """
        token = self._parse(identity_token)
        identity, issuer = _identity(token)
        if allowed_identities is not None:
            patterns = list(allowed_identities)
            if not any(fnmatchcase(identity, p) for p in patterns):
                raise IdentityNotAllowed(f"identity {identity!r} is not in allowed_identities")
        dsse_statement = _dsse_statement(statement)
        context = self._signing_context()
        fulcio_url = context._fulcio.url
        rekor_url = getattr(context._rekor, "url", "?")
        _bound_thread_sessions(context, self._timeout)

        with _mapped_errors("Fulcio", fulcio_url):
            # With cache=True the Signer asks Fulcio for the certificate (and checks its
            # SCT) right here, so a failure in this block is Fulcio's, not Rekor's.
            signer = Signer(token, context, cache=True)
        with _mapped_errors("Rekor", rekor_url):
            bundle = signer.sign_dsse(dsse_statement)
        # The entry is already in the (public) log at this point; refusing still keeps a
        # signature the policy did not approve out of the service's hands.
        _check_certificate(bundle.signing_certificate, identity, issuer)
        result: dict[str, Any] = json.loads(bundle.to_json())
        return result

    def _signing_context(self) -> SigningContext:
        with self._lock:
            if self._context is None:
                self._trust_config = self._fetch_public_trust_config()
                self._context = _context_from(self._trust_config, self._timeout)
            return self._context

    def _fetch_public_trust_config(self) -> ClientTrustConfig:
        url = STAGING_TUF if self._staging else PUBLIC_GOOD_TUF
        try:
            return ClientTrustConfig.staging() if self._staging else ClientTrustConfig.production()
        except Exception as exc:  # TUF, requests and OS errors alike: none is recoverable
            raise BackendUnavailable(
                f"Sigstore TUF repository at {url} unreachable or invalid: {_why(exc)}"
            ) from exc

    # --- health ------------------------------------------------------------------

    def health(self) -> Health:
        """What this signer would talk to. Never contacts Fulcio, Rekor or TUF."""
        if self._trust_config is None:
            where = "staging" if self._staging else "public-good"
            url = STAGING_TUF if self._staging else PUBLIC_GOOD_TUF
            return Health(
                ok=True,
                detail=f"sigstore {where}: trust config not loaded yet "
                f"(fetched from {url} at first sign); Fulcio/Rekor not contacted",
            )
        urls = trust_config_urls(self._trust_config)
        source = self._path or ("staging TUF" if self._staging else "public-good TUF")
        return Health(
            ok=True,
            detail=f"sigstore trust config loaded from {source}: Fulcio {urls['fulcio']}, "
            f"Rekor {urls['rekor']}, OIDC {urls['oidc'] or '-'}; not contacted",
        )


# --- trust config ------------------------------------------------------------------


def load_trust_config(path: str) -> ClientTrustConfig:
    """Read and validate a ``ClientTrustConfig`` file as model_signing does, offline."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TrustConfigError(f"trust config {path}: cannot read: {exc.strerror}") from None
    try:
        config = ClientTrustConfig.from_json(raw)
        # The properties validate lazily; touch them so problems surface here.
        config.trusted_root  # noqa: B018
        config.signing_config  # noqa: B018
    except Exception as exc:  # pydantic, sigstore and JSON errors: all mean "bad file"
        raise TrustConfigError(f"trust config {path} is invalid: {_field_errors(exc)}") from None
    return config


def _field_errors(exc: Exception) -> str:
    """Name the offending fields of a pydantic error ("signingConfig.mediaType: ...")."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return _why(exc)
    try:
        items = errors()
    except Exception:  # not a pydantic error after all
        return _why(exc)
    parts = [".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg")) for e in items]
    return "; ".join(parts[:3]) or _why(exc)


def trust_config_urls(config: ClientTrustConfig) -> dict[str, str | None]:
    """The Fulcio, Rekor and OIDC URLs sigstore will use with this trust config."""
    signing = config.signing_config
    try:
        oidc: str | None = signing.get_oidc_url()
    except SigstoreError:
        oidc = None
    return {
        "fulcio": signing.get_fulcio().url,
        "rekor": getattr(signing.get_tlogs()[0], "url", None),
        "oidc": oidc,
    }


def _context_from(config: ClientTrustConfig, timeout: tuple[float, float]) -> SigningContext:
    try:
        context = SigningContext.from_trust_config(config)
    except Exception as exc:
        raise TrustConfigError(f"trust config has no usable Fulcio/Rekor: {_why(exc)}") from None
    # Fulcio's client holds one session shared by all threads: bound it once, here.
    _bound(context._fulcio.session, timeout)
    return context


def _bound_thread_sessions(context: SigningContext, timeout: tuple[float, float]) -> None:
    """Put timeouts on the Rekor and TSA sessions of the calling thread.

    sigstore's Rekor and TSA clients create one session per thread, lazily, so the
    ``_session`` property is read here, in the signing thread. These are private
    attributes of sigstore 4.5.1; the black-hole tests pin the assumption.
    """
    for client in (context._rekor, *context._tsa_clients):
        session = getattr(client, "_session", None)
        if isinstance(session, requests.Session):
            _bound(session, timeout)


# --- helpers -----------------------------------------------------------------------


def _identity(token: sigstore_oidc.IdentityToken) -> tuple[str, str]:
    """Predict the certificate's SAN and issuer the way Fulcio computes them."""
    claims: dict[str, Any] = token._unverified_claims
    if token.issuer == GITHUB_ACTIONS_ISSUER:
        ref = claims.get("job_workflow_ref")
        if not isinstance(ref, str) or not ref:
            raise IdentityTokenError("GitHub Actions token has no 'job_workflow_ref' claim")
        return _GITHUB_BASE + ref, token.issuer
    if "email" in claims and token.identity == claims["email"]:
        # Fulcio refuses unverified e-mail addresses; refuse early with a clear reason.
        if claims.get("email_verified") is False:
            raise IdentityTokenError(f"e-mail {token.identity!r} is not verified by the issuer")
    return token.identity, token.federated_issuer


def _token_problem(exc: Exception, client_id: str) -> str:
    """Name the problem with a token from sigstore's wrapped PyJWT error. No token text."""
    cause = exc.__cause__
    if isinstance(cause, jwt.ExpiredSignatureError):
        return "identity token has expired"
    if isinstance(cause, jwt.ImmatureSignatureError):
        return "identity token is not valid yet (iat/nbf in the future)"
    if isinstance(cause, jwt.InvalidAudienceError):
        return f"identity token has the wrong audience (Fulcio needs {client_id!r})"
    if isinstance(cause, jwt.MissingRequiredClaimError):
        return f"identity token is missing the {cause.claim!r} claim"
    if isinstance(cause, jwt.DecodeError):
        return "identity token is malformed (not a JWT)"
    if cause is not None:
        return f"identity token rejected: {cause}"
    return f"identity token rejected: {exc}"


def _dsse_statement(statement: Mapping[str, Any]) -> sigstore_dsse.Statement:
    # sigstore keeps these exact bytes as the DSSE payload (no re-serialisation) and
    # signs them with payload type application/vnd.in-toto+json, i.e. our PAYLOAD_TYPE.
    try:
        return sigstore_dsse.Statement(statement_payload(statement))
    except Exception as exc:
        raise KeyNotUsable(f"statement is not a valid in-toto statement: {_why(exc)}") from None


def _check_certificate(cert: x509.Certificate, identity: str, issuer: str) -> None:
    """Refuse a bundle whose certificate names someone other than the matched identity.

    The policy matched the identity we predicted from the token; if the instance's
    Fulcio derives it differently, the check was about the wrong name.
    """
    names = certificate_identities(cert)
    if identity not in names:
        raise KeyNotUsable(
            f"Fulcio issued a certificate for {sorted(names)} but the policy matched "
            f"{identity!r}; refusing the bundle"
        )
    cert_issuer = certificate_issuer(cert)
    if cert_issuer is not None and cert_issuer != issuer:
        raise KeyNotUsable(
            f"Fulcio certificate issuer {cert_issuer!r} differs from token issuer {issuer!r}"
        )


def certificate_identities(cert: x509.Certificate) -> set[str]:
    """E-mail and URI subject alternative names of a certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.RFC822Name)) | set(
        san.get_values_for_type(x509.UniformResourceIdentifier)
    )


def certificate_issuer(cert: x509.Certificate) -> str | None:
    """The OIDC issuer Fulcio recorded in the certificate, if any."""
    for oid, der in ((_OID_ISSUER_V2, True), (_OID_ISSUER_V1, False)):
        try:
            value = cert.extensions.get_extension_for_oid(oid).value
        except x509.ExtensionNotFound:
            continue
        raw = value.value  # type: ignore[attr-defined]
        # V2 is a DER UTF8String (tag 0x0c, short length); V1 is the raw string.
        if der and len(raw) >= 2 and raw[0] == 0x0C and raw[1] < 0x80:
            raw = raw[2:]
        return bytes(raw).decode("utf-8", "replace")
    return None


@contextmanager
def _mapped_errors(service: str, url: str) -> Iterator[None]:
    """Turn sigstore and requests errors into ``BackendUnavailable`` naming the service."""
    try:
        yield
    except sigstore_oidc.ExpiredIdentity:
        raise IdentityTokenError("identity token expired before Fulcio was asked") from None
    except ExpiredCertificate:
        raise BackendUnavailable("Fulcio certificate expired before signing finished") from None
    except requests.Timeout:
        raise BackendUnavailable(f"{service} at {url} timed out") from None
    except requests.ConnectionError as exc:
        raise BackendUnavailable(f"{service} at {url} unreachable: {_why(exc)}") from None
    except (FulcioClientError, RekorClientError, requests.RequestException) as exc:
        raise BackendUnavailable(f"{service} at {url} refused the request: {_why(exc)}") from None
    except SigstoreError as exc:
        raise BackendUnavailable(f"{service} at {url}: {_why(exc)}") from None
    except (ValueError, KeyError) as exc:
        # e.g. a non-JSON or malformed answer, or an SCT that does not verify.
        raise BackendUnavailable(f"{service} at {url} sent a bad answer: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    """A one-line reason. For network errors the innermost cause ("Connection refused")
    is the readable part; requests' outer "Max retries exceeded" text is misleading."""
    root: BaseException = exc
    while (nxt := root.__cause__ or root.__context__) is not None:
        root = nxt
    if isinstance(root, OSError) and root is not exc:
        text = root.strerror or str(root)
    else:
        text = str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
