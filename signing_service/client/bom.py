"""A CycloneDX 1.6 ML-BOM for a signed model (``modelsign bom``).

What the BOM holds:

* the model as one ``machine-learning-model`` component: name and version from the signed
  statement, SHA-256 the statement's root digest (model_signing's digest over its files'
  digests), and ``modelsign:*`` properties for the signature: authority, key hint, signer
  identity, requester, one ``modelsign:approver`` per approval with its decision time,
  request id, signing time, statement digests, ignore paths;
* one ``file`` component per signed file with its SHA-256; the model depends on each;
* the bundle as a ``digital-signature`` external reference with its SHA-256;
* provenance when present: the summary the signed statement carries (builder id, build
  type, the provenance statement's digest) and, with a provenance bundle (SLSA v1), builder
  id, build type, source repository and commit as properties and ``vcs`` /
  ``build-system`` references, the provenance bundle as an ``attestation`` reference.

This module describes; it does not judge. The caller (``modelsign bom``) re-hashes the
model and refuses when it differs from the statement, and states in
``modelsign:signature_check`` whether and how the bundle's signature was checked. A
provenance bundle's own signature is not checked here: it must be for the model (subject
digest = root digest) and, when the signed statement names a provenance, be that one (same
statement digest), in which case the model's signature covers it;
``modelsign:provenance:signature_check`` says which.

Output is deterministic: the serial number is a UUID derived from the digests of the
signed statement, the bundle and the provenance; the timestamp is the signing time; every
bom-ref is derived from names. The same inputs give byte-identical BOMs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509

from signing_service import bundle
from signing_service.bundle import VerifiedStatement

if TYPE_CHECKING:
    from cyclonedx.model.bom import Bom

__all__ = [
    "BOUND",
    "NAMESPACE",
    "NOT_CHECKED",
    "BomError",
    "Provenance",
    "Signature",
    "build_bom",
    "check_provenance",
    "read_provenance",
    "read_signature",
    "render",
    "signed_provenance",
]

NAMESPACE = "modelsign"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENTS = ("https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1")
SIGSTORE_BUNDLE_PREFIX = "application/vnd.dev.sigstore.bundle"
NOT_CHECKED = "not checked"
BOUND = "named by the model's signed statement (its statement digest)"
# Fixed for good: changing it changes the serial number of every BOM ever written.
_SERIAL_NAMESPACE = uuid.UUID("6d0c3f1e-8a55-4c5e-9b0f-4d6f2a1b7c39")
_OID_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
_OID_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
#: Past this many files the schema check sees a sample of them; see :func:`render`.
VALIDATE_FILES = 500
_INSTALL_HINT = "pip install 'modelsign-service[client]'"


class BomError(ValueError):
    """The inputs cannot be described as asked; the message names the input and why."""


@dataclass(frozen=True)
class Signature:
    """A model signature as the BOM describes it."""

    statement: VerifiedStatement
    bundle_name: str
    bundle_sha256: str
    #: Certificate-signed (keyless) bundles: the certificate's e-mail/URI names and issuer.
    certificate_identity: str | None
    certificate_issuer: str | None
    #: How the signature was checked, in words; :data:`NOT_CHECKED` if it was not.
    check: str

    @property
    def signer_identity(self) -> str | None:
        # Key-based authorities sign for the requester (the policy's authorized signer).
        requester = _text(self.statement.service_metadata.get("requester"))
        return self.certificate_identity or requester


@dataclass(frozen=True)
class Provenance:
    """What the BOM takes from an SLSA v1 provenance bundle."""

    file_name: str
    sha256: str
    #: SHA-256 of the statement's canonical JSON: what a signed statement names it by.
    statement_digest: str
    subject_digests: frozenset[str]
    builder_id: str | None
    build_type: str | None
    source_uri: str | None
    source_commit: str | None
    invocation_id: str | None


# --- reading inputs --------------------------------------------------------------------


def read_signature(
    data: bytes, name: str, statement: VerifiedStatement, check: str = NOT_CHECKED
) -> Signature:
    """Describe the bundle ``data`` (file ``name``) whose statement has been read."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BomError(f"--signature {name} is not JSON: {exc}") from None
    material = parsed.get("verificationMaterial") if isinstance(parsed, dict) else None
    cert = _certificate(material if isinstance(material, dict) else {}, name)
    identity, issuer = (None, None) if cert is None else _certificate_names(cert)
    return Signature(
        statement=statement,
        bundle_name=name,
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        certificate_identity=identity,
        certificate_issuer=issuer,
        check=check,
    )


def _certificate(material: Mapping[str, Any], name: str) -> x509.Certificate | None:
    """The signing certificate: bundle v0.3 ``certificate`` or a chain's first entry."""
    single = material.get("certificate")
    chain = material.get("x509CertificateChain")
    if isinstance(single, dict):
        raw = single.get("rawBytes")
    elif isinstance(chain, dict) and isinstance(chain.get("certificates"), list):
        first = chain["certificates"][0] if chain["certificates"] else None
        raw = first.get("rawBytes") if isinstance(first, dict) else None
    else:
        return None
    try:
        return x509.load_der_x509_certificate(base64.b64decode(str(raw), validate=True))
    except (ValueError, binascii.Error) as exc:
        raise BomError(f"--signature {name}: its certificate is unreadable: {exc}") from None


def _certificate_names(cert: x509.Certificate) -> tuple[str | None, str | None]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = sorted(
            set(san.get_values_for_type(x509.RFC822Name))
            | set(san.get_values_for_type(x509.UniformResourceIdentifier))
        )
    except x509.ExtensionNotFound:
        names = []
    return (", ".join(names) or None), _fulcio_issuer(cert)


def _fulcio_issuer(cert: x509.Certificate) -> str | None:
    """The OIDC issuer Fulcio records (V2: a DER UTF8String; V1: the raw text)."""
    for oid, der in ((_OID_ISSUER_V2, True), (_OID_ISSUER_V1, False)):
        try:
            raw = bytes(cert.extensions.get_extension_for_oid(oid).value.value)  # type: ignore[attr-defined]
        except x509.ExtensionNotFound:
            continue
        if der and len(raw) >= 2 and raw[0] == 0x0C and raw[1] < 0x80:
            raw = raw[2:]
        return raw.decode("utf-8", "replace") or None
    return None


def read_provenance(data: bytes, name: str) -> Provenance:
    """Parse a Sigstore bundle whose DSSE payload is an SLSA v1 provenance statement."""
    statement = _provenance_statement(data, name)
    if statement.get("predicateType") != SLSA_PROVENANCE_V1:
        raise BomError(
            f"--provenance {name}: predicateType is {statement.get('predicateType')!r}, "
            f"expected {SLSA_PROVENANCE_V1!r}"
        )
    digests = frozenset(_subject_digests(statement.get("subject")))
    if not digests:
        raise BomError(f"--provenance {name}: its statement has no subject with a sha256 digest")
    predicate = _mapping(statement.get("predicate"))
    definition = _mapping(predicate.get("buildDefinition"))
    run = _mapping(predicate.get("runDetails"))
    source_uri, commit = _source(definition)
    return Provenance(
        file_name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        statement_digest=hashlib.sha256(bundle.statement_payload(statement)).hexdigest(),
        subject_digests=digests,
        builder_id=_text(_mapping(run.get("builder")).get("id")),
        build_type=_text(definition.get("buildType")),
        source_uri=source_uri,
        source_commit=commit,
        invocation_id=_text(_mapping(run.get("metadata")).get("invocationId")),
    )


def _provenance_statement(data: bytes, name: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BomError(f"--provenance {name} is not JSON: {exc}") from None
    media = parsed.get("mediaType") if isinstance(parsed, dict) else None
    if not isinstance(media, str) or not media.startswith(SIGSTORE_BUNDLE_PREFIX):
        raise BomError(f"--provenance {name} is not a Sigstore bundle (no sigstore mediaType)")
    envelope = parsed.get("dsseEnvelope")
    if not isinstance(envelope, dict) or envelope.get("payloadType") != IN_TOTO_PAYLOAD_TYPE:
        raise BomError(f"--provenance {name}: the bundle holds no in-toto DSSE envelope")
    try:
        statement = json.loads(base64.b64decode(str(envelope.get("payload")), validate=True))
    except (ValueError, binascii.Error, RecursionError):
        raise BomError(f"--provenance {name}: the DSSE payload is not base64 JSON") from None
    if not isinstance(statement, dict) or statement.get("_type") not in IN_TOTO_STATEMENTS:
        raise BomError(f"--provenance {name}: the DSSE payload is not an in-toto statement")
    return statement


def _subject_digests(subjects: object) -> Iterator[str]:
    for subject in subjects if isinstance(subjects, list) else []:
        digest = _mapping(_mapping(subject).get("digest")).get("sha256")
        if isinstance(digest, str) and digest:
            yield digest.lower()


def _source(definition: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Source repository and commit: the first resolved dependency pinned to a git commit,
    else the repository the external parameters name (GitHub: ``workflow.repository``)."""
    deps = definition.get("resolvedDependencies")
    for dep in deps if isinstance(deps, list) else []:
        digest = _mapping(_mapping(dep).get("digest"))
        commit = _text(digest.get("gitCommit")) or _text(digest.get("sha1"))
        if commit and _text(dep.get("uri")):
            return dep["uri"], commit
    params = _mapping(definition.get("externalParameters"))
    for key in ("workflow", "source"):
        value = params.get(key)
        if isinstance(value, dict):
            uri = _text(value.get("repository")) or _text(value.get("uri"))
            if uri:
                return uri, None
        elif _text(value):
            return str(value), None
    return None, None


def check_provenance(provenance: Provenance | None, statement: VerifiedStatement) -> None:
    """Refuse provenance for other content than the model (another subject digest), or other
    than the provenance the signed statement names."""
    signed = signed_provenance(statement)
    if signed and signed.get("subject_digest") not in (None, statement.root_digest):
        raise BomError(
            f"the signed statement's provenance is for other content: subject digest "
            f"{signed['subject_digest']}, model root digest {statement.root_digest}"
        )
    if provenance is None:
        return
    if statement.root_digest not in provenance.subject_digests:
        listed = ", ".join(sorted(provenance.subject_digests))
        raise BomError(
            f"--provenance {provenance.file_name} is for other content: its subject digest "
            f"({listed}) is not the model's root digest {statement.root_digest}"
        )
    named = signed.get("statement_digest")
    if named is not None and named != provenance.statement_digest:
        raise BomError(
            f"--provenance {provenance.file_name} is not the provenance the signature names: "
            f"its statement digest is {provenance.statement_digest}, the signed one {named}"
        )


def signed_provenance(statement: VerifiedStatement) -> dict[str, str]:
    """The provenance summary in the signed statement (text fields only), or {}."""
    summary = statement.service_metadata.get("provenance")
    if not isinstance(summary, dict):
        return {}
    return {k: v for k, v in summary.items() if isinstance(k, str) and _text(v)}


# --- the BOM ---------------------------------------------------------------------------


def build_bom(signature: Signature, provenance: Provenance | None = None) -> Bom:
    """The CycloneDX BOM of a signed model whose files were checked against ``signature``."""
    try:
        from cyclonedx.model.bom import Bom
        from cyclonedx.model.component import Component, ComponentType
        from cyclonedx.model.dependency import Dependency
    except ImportError:
        raise BomError(f"modelsign bom needs cyclonedx-python-lib: {_INSTALL_HINT}") from None

    statement = signature.statement
    check_provenance(provenance, statement)
    files = [
        Component(
            type=ComponentType.FILE,
            name=statement.model_name if r.name == "." else r.name,
            bom_ref=f"file:{r.name}",
            hashes=[_sha256(r.digest)],
        )
        for r in statement.resources
    ]
    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=statement.model_name,
        version=_text(statement.service_metadata.get("model_version")),
        bom_ref=f"model:sha256:{statement.root_digest}",
        description=(
            "ML model signed with OpenSSF model_signing; its SHA-256 is the root digest "
            "over its files' digests"
        ),
        hashes=[_sha256(statement.root_digest)],
        properties=_properties(signature, provenance),
        external_references=_references(signature, provenance),
    )
    bom = Bom(components=[model, *files], serial_number=_serial(signature, provenance))
    # No signing time, no timestamp: never the time of the run, which would vary.
    bom.metadata.timestamp = _signed_at(statement)  # type: ignore[assignment]
    bom.metadata.tools.components.add(
        Component(type=ComponentType.APPLICATION, name="modelsign", version=_version())
    )
    # Built in one go: Bom.register_dependency scans the whole graph on every call.
    bom.dependencies = [  # type: ignore[assignment]
        Dependency(model.bom_ref, [Dependency(f.bom_ref) for f in files]),
        *(Dependency(f.bom_ref) for f in files),
    ]
    _check_graph(bom)
    # Bom.validate, which every serializer calls, registers each component through that
    # scan (quadratic: 15 minutes for 10,000 files). What it checks for a BOM like this one
    # (every component in the graph, every reference known; no licenses to check) is what
    # _check_graph just did.
    bom.validate = lambda: True  # type: ignore[method-assign]
    return bom


def _check_graph(bom: Bom) -> None:
    components = {str(c.bom_ref) for c in bom.components}
    entries = {str(d.ref) for d in bom.dependencies}
    named = {str(r) for d in bom.dependencies for r in d.dependencies_as_bom_refs()}
    if len(components) != len(bom.components) or entries != components or not named <= components:
        raise BomError("internal error: the BOM's dependency graph does not match its components")


def render(bom: Bom) -> str:
    """The BOM as CycloneDX 1.6 JSON, checked against the schema before it is returned.

    The schema's ``uniqueItems`` makes jsonschema compare every pair of components, hours
    for a big model; so past :data:`VALIDATE_FILES` files the schema sees the document
    with only the first of them (every file component is built the same way). Unique
    bom-refs, what that rule protects, are checked when the BOM is built.
    """
    try:
        from cyclonedx.exception import MissingOptionalDependencyException
        from cyclonedx.output.json import JsonV1Dot6
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError:
        raise BomError(f"modelsign bom needs cyclonedx-python-lib: {_INSTALL_HINT}") from None
    text = JsonV1Dot6(bom).output_as_string(indent=2) + "\n"
    try:
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(_for_schema(text))
    except MissingOptionalDependencyException:
        raise BomError(
            f"modelsign bom validates its output with jsonschema: {_INSTALL_HINT}"
        ) from None
    if error is not None:  # a bug here, or a value the schema refuses: never write it
        raise BomError(f"the BOM does not validate against CycloneDX 1.6: {error}")
    return text


def _for_schema(text: str) -> str:
    doc = json.loads(text)
    files = [c for c in doc["components"] if c["type"] == "file"]
    if len(files) <= VALIDATE_FILES:
        return text
    kept = {c["bom-ref"] for c in files[:VALIDATE_FILES]}
    doc["components"] = [
        c for c in doc["components"] if c["type"] != "file" or c["bom-ref"] in kept
    ]
    doc["dependencies"] = [
        {**d, "dependsOn": [r for r in d["dependsOn"] if r in kept]} if "dependsOn" in d else d
        for d in doc["dependencies"]
        if d["ref"] in kept or "dependsOn" in d
    ]
    return json.dumps(doc)


def _properties(signature: Signature, provenance: Provenance | None) -> list[Any]:
    from cyclonedx.model import Property

    statement = signature.statement
    meta = statement.service_metadata
    fields: list[tuple[str, object]] = [
        ("authority", meta.get("authority")),
        ("key_hint", meta.get("key_hint") or statement.hint),
        ("signer_identity", signature.signer_identity),
        ("signer_issuer", signature.certificate_issuer),
        ("requester", meta.get("requester")),
        ("request_id", meta.get("request_id")),
        ("signed_at", meta.get("signed_at")),
        ("statement_digest", meta.get("statement_digest")),
        ("signed_statement_sha256", hashlib.sha256(statement.payload).hexdigest()),
        ("policy_digest", meta.get("policy_digest")),
        ("bundle_sha256", signature.bundle_sha256),
        ("signature_check", signature.check),
        *(("ignore_path", path) for path in statement.ignore_paths),
        *(("approver", approver) for approver in _approvers(meta.get("approvals"))),
    ]
    signed = signed_provenance(statement)
    if provenance is not None:
        bound = signed.get("statement_digest") == provenance.statement_digest
        fields += [
            ("provenance:builder_id", provenance.builder_id),
            ("provenance:build_type", provenance.build_type),
            ("provenance:source_uri", provenance.source_uri),
            ("provenance:source_commit", provenance.source_commit),
            ("provenance:invocation_id", provenance.invocation_id),
            ("provenance:statement_digest", provenance.statement_digest),
            ("provenance:bundle_sha256", provenance.sha256),
            ("provenance:signature_check", BOUND if bound else NOT_CHECKED),
        ]
    elif signed:
        fields += [
            ("provenance:builder_id", signed.get("builder_id")),
            ("provenance:build_type", signed.get("build_type")),
            ("provenance:statement_digest", signed.get("statement_digest")),
        ]
    return [
        Property(name=f"{NAMESPACE}:{name}", value=text)
        for name, value in fields
        if (text := _text(value)) is not None
    ]


def _approvers(records: object) -> Iterator[str]:
    """One compact JSON object per approval: ``{"approver": ..., "decided_at": ...}``."""
    for record in records if isinstance(records, list) else []:
        fields = _mapping(record)
        if approver := _text(fields.get("approver")):
            value = {"approver": approver, "decided_at": _text(fields.get("decided_at"))}
            yield json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _references(signature: Signature, provenance: Provenance | None) -> list[Any]:
    from cyclonedx.model import ExternalReferenceType as Type

    refs = [
        _reference(
            Type.DIGITAL_SIGNATURE,
            signature.bundle_name,
            "Sigstore bundle: the model_signing signature over the in-toto statement",
            signature.bundle_sha256,
        )
    ]
    if provenance is not None:
        commit = f"commit {provenance.source_commit}" if provenance.source_commit else None
        build = f"build type {provenance.build_type}" if provenance.build_type else None
        refs += [
            _reference(
                Type.ATTESTATION,
                provenance.file_name,
                "SLSA v1 provenance (Sigstore bundle)",
                provenance.sha256,
            ),
            _reference(Type.VCS, provenance.source_uri, commit),
            _reference(Type.BUILD_SYSTEM, provenance.builder_id, build),
        ]
    return [r for r in refs if r is not None]


def _reference(kind: Any, url: str | None, comment: str | None, sha256: str | None = None) -> Any:
    from cyclonedx.exception.model import InvalidUriException
    from cyclonedx.model import ExternalReference, XsUri

    if not url:
        return None
    try:
        uri = XsUri(url)
    except InvalidUriException:
        return None  # the value is still in the properties
    hashes = [_sha256(sha256)] if sha256 else None
    return ExternalReference(type=kind, url=uri, comment=comment, hashes=hashes)


def _sha256(digest: str) -> Any:
    from cyclonedx.model import HashAlgorithm, HashType

    return HashType(alg=HashAlgorithm.SHA_256, content=digest)


def _serial(signature: Signature, provenance: Provenance | None) -> uuid.UUID:
    parts = [
        hashlib.sha256(signature.statement.payload).hexdigest(),
        signature.bundle_sha256,
        provenance.sha256 if provenance else "",
        signature.check,
    ]
    return uuid.uuid5(_SERIAL_NAMESPACE, "|".join(parts))


def _signed_at(statement: VerifiedStatement) -> datetime | None:
    value = _text(statement.service_metadata.get("signed_at"))
    try:
        when = datetime.fromisoformat(value) if value else None
    except ValueError:
        return None  # the raw text is still in modelsign:signed_at
    return when if when is None or when.tzinfo is not None else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelsign-service")
    except PackageNotFoundError:
        return "unknown"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
