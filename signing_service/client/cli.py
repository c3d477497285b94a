"""The `modelsign` command line: hash, sign (submit, wait, fetch), verify, public-key,
trust fetch.

Exit codes: 0 success; 1 any error, a failed request or a failed verification; 2 the
signing request was rejected, expired or cancelled; 130 interrupted.

Imports are kept lazy where they are costly (``cryptography``, ``urllib.request``) so
that ``modelsign hash`` starts fast; hashing is benchmarked end to end.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from signing_service.client import hashing
from signing_service.client.progress import ProgressBar, StatusLine
from signing_service.manifest import ManifestError, validate_resources

if TYPE_CHECKING:
    from datetime import datetime

    from signing_service import slsa
    from signing_service.bundle import VerifiedStatement
    from signing_service.client import gate, trust
    from signing_service.client.api import ServiceClient

__all__ = ["EXIT_DENIED", "EXIT_ERROR", "EXIT_OK", "ci_metadata", "main"]

EXIT_OK, EXIT_ERROR, EXIT_DENIED, EXIT_INTERRUPTED = 0, 1, 2, 130
DENIED_STATES = frozenset({"rejected", "expired", "cancelled"})
FINAL_STATES = DENIED_STATES | {"signed", "failed"}
POLL_START = 0.1  # seconds between polls at first (the worker signs in ~0.1 s) ...
POLL_MAX = 5.0  # ... backing off to this
POLL_FACTOR = 1.5  # 0.1, 0.15, 0.23 ... 5 s: 10 polls in the first 11 s
_TICK = 0.2  # spinner refresh while waiting between polls
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


class CliError(Exception):
    """An expected failure: printed as ``modelsign: error: <message>``, no traceback."""

    exit_code = EXIT_ERROR


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Usage errors exit 1, not argparse's 2: 2 means "rejected" to CI scripts.
        self.print_usage(sys.stderr)
        raise CliError(message)


# --- small helpers ---------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"modelsign: error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"modelsign: warning: {message}", file=sys.stderr)


def _info(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _printable(value: object) -> str:
    # Text from the server goes to a terminal: no escape sequences from it.
    return "".join(ch if ch.isprintable() else " " for ch in str(value))


def _inside_model(model: Path, path: Path) -> str | None:
    """``path`` relative to the model directory (POSIX), or None if it is not inside."""
    try:
        rel = path.resolve().relative_to(model.resolve())
    except ValueError:
        return None
    return rel.as_posix()


def _user_ignore_paths(model: Path, paths: Sequence[str]) -> list[str]:
    """Resolve --ignore-paths as model_signing's CLI does: relative to the current dir."""
    out: list[str] = []
    for p in paths:
        rel = _inside_model(model, Path(p))
        if rel is None:
            _warn(f"--ignore-paths {p}: not inside the model {model}, so nothing is ignored")
        elif rel == ".":
            raise CliError(f"--ignore-paths {p} is the model itself")
        else:
            out.append(rel)
    return out


def _hash(
    model: Path, ignore_paths: Sequence[str], *, quiet: bool, workers: int | None
) -> hashing.HashResult:
    scan = hashing.scan_model(model, ignore_paths=ignore_paths)
    label = f"hashing {len(scan.files)} file{'s' if len(scan.files) != 1 else ''}"
    with ProgressBar(scan.total_bytes, label=label, enabled=not quiet) as bar:
        return hashing.hash_files(scan, workers=workers, progress=None if quiet else bar.update)


def _hash_cached(
    model: Path, ignores: Sequence[str], args: argparse.Namespace
) -> hashing.HashResult:
    from signing_service.client import hashcache

    cache_file = Path(args.cache_file) if args.cache_file else hashcache.default_cache_file(model)
    scan = hashing.scan_model(model, ignore_paths=ignores)
    with ProgressBar(
        scan.total_bytes, label="hashing changed files", enabled=not args.quiet
    ) as bar:
        cached = hashcache.hash_with_cache(
            scan, cache_file, workers=args.workers, progress=None if args.quiet else bar.update
        )
    _info(f"reused {cached.reused} of {len(scan.files)} digests from {cache_file}", args.quiet)
    return cached.result


def _expected_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CliError, hashing.HashError, ManifestError, OSError]
    # Only modules already loaded: importing them just to catch their errors costs time.
    for module, name in (
        ("signing_service.client.api", "ClientError"),
        ("signing_service.bundle", "BundleError"),
        ("signing_service.client.trust", "TrustError"),
        ("signing_service.client.ci_oidc", "CiTokenError"),
        ("signing_service.client.bom", "BomError"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


# --- hash ------------------------------------------------------------------------------


def cmd_hash(args: argparse.Namespace) -> int:
    model = Path(args.path)
    ignores = _user_ignore_paths(model, args.ignore_paths)
    if args.cache or args.cache_file:
        result = _hash_cached(model, ignores, args)
    else:
        result = _hash(model, ignores, quiet=args.quiet, workers=args.workers)
    json.dump(result.to_json(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


# --- sign ------------------------------------------------------------------------------


def ci_metadata(env: Mapping[str, str]) -> dict[str, str]:
    """Provenance of the CI run from GitHub Actions or GitLab CI variables (empty if none)."""
    if env.get("GITHUB_ACTIONS") == "true" or env.get("GITHUB_REPOSITORY"):
        repo = env.get("GITHUB_REPOSITORY", "")
        server, run = env.get("GITHUB_SERVER_URL", ""), env.get("GITHUB_RUN_ID", "")
        run_url = f"{server}/{repo}/actions/runs/{run}" if server and repo and run else ""
        fields = {
            "repository": repo,
            "commit": env.get("GITHUB_SHA", ""),
            "ref": env.get("GITHUB_REF", ""),
            "pipeline_url": run_url,
            "actor": env.get("GITHUB_ACTOR", ""),
        }
    else:
        fields = {
            "repository": env.get("CI_PROJECT_PATH", ""),
            "commit": env.get("CI_COMMIT_SHA", ""),
            "ref": env.get("CI_COMMIT_REF_NAME", ""),
            "pipeline_url": env.get("CI_PIPELINE_URL", ""),
            "actor": env.get("GITLAB_USER_LOGIN", ""),
        }
    return {k: v for k, v in fields.items() if v}


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"cannot read --token-file: {exc.strerror}") from None
    else:
        token = (args.token or os.environ.get("MODELSIGN_TOKEN", "")).strip()
    if not token:
        raise CliError("no API token: set MODELSIGN_TOKEN, or use --token-file or --token")
    return token


def _credential(args: argparse.Namespace) -> str | Callable[[], str]:
    """The API token, or with --oidc the CI job's ID token source (see client/ci_oidc.py)."""
    if not getattr(args, "oidc", False):
        if args.oidc_audience or args.oidc_token_file:
            raise CliError("--oidc-audience and --oidc-token-file need --oidc")
        return _token(args)
    from signing_service.client import ci_oidc

    audience = args.oidc_audience or os.environ.get("MODELSIGN_OIDC_AUDIENCE") or args.server
    return ci_oidc.token_source(
        audience=audience.rstrip("/"),
        env=os.environ,
        token_env=args.oidc_token_env,
        token_file=args.oidc_token_file,
    )


def _client(server: str, token: str | Callable[[], str] | None) -> ServiceClient:
    from urllib.parse import urlsplit

    from signing_service.client.api import ServiceClient

    client = ServiceClient(server, token)
    parts = urlsplit(client.base)
    if token and parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        what = "the API token" if isinstance(token, str) else "the CI ID token"
        _warn(f"sending {what} to {client.base} over plain HTTP; use https://")
    return client


def _request_body(args: argparse.Namespace, result: hashing.HashResult) -> dict[str, Any]:
    resources = [r.to_json() for r in result.resources]
    try:
        validate_resources(resources, max_resources=len(resources) or 1)
    except ManifestError as exc:  # fail before the upload, with the file's name
        raise CliError(f"the service will not accept this model: {exc}") from None
    version = args.model_version or os.environ.get("MODEL_VERSION") or result.root_digest[:12]
    body: dict[str, Any] = {
        "model": args.model_name or result.model,
        "version": version,
        "environment": args.environment,
        "resources": resources,
        "ignore_paths": list(result.ignore_paths),
    }
    ci = ci_metadata(os.environ)
    if ci:
        body["ci"] = ci
    return body


def _describe(req: Mapping[str, Any]) -> str:
    approvals = req.get("approvals") if isinstance(req.get("approvals"), dict) else {}
    text = f"request {req.get('id')}: {req.get('state')}"
    if approvals and approvals.get("required"):
        text += f" (approvals {approvals.get('received', 0)}/{approvals.get('required')})"
    waiting = req.get("waiting_reason")
    if isinstance(waiting, str) and waiting:
        text += f", waiting: {_printable(waiting)}"
    return text


def _link(req: Mapping[str, Any], name: str) -> str | None:
    links = req.get("links")
    value = links.get(name) if isinstance(links, dict) else None
    return value if isinstance(value, str) and value else None


def _sleep(seconds: float, status: StatusLine, text: str) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(_TICK, left))
        status.update(text)


def _wait(
    client: ServiceClient, req: dict[str, Any], timeout: float, quiet: bool
) -> dict[str, Any]:
    """Poll the request until it reaches a final state; CliError after ``timeout`` s."""
    if req.get("state") in FINAL_STATES:
        return req
    page = _link(req, "approval_page")
    if page:
        print(f"approval needed: {page}", file=sys.stderr)  # even with --quiet: act on it
    self_url = _link(req, "self")
    if not self_url:
        raise CliError(f"the server's answer has no links.self to poll ({_describe(req)})")
    deadline = time.monotonic() + timeout
    interval = POLL_START
    with StatusLine(enabled=not quiet) as status:
        while True:
            text = _describe(req)
            status.update(text)
            left = deadline - time.monotonic()
            if left <= 0:
                raise CliError(
                    f"timed out after {timeout:g} s waiting; {text}"
                    + (f"; approve at {page}" if page else "")
                )
            _sleep(min(interval, left), status, text)
            req = client.get(self_url)
            if req.get("state") in FINAL_STATES:
                status.update(_describe(req))  # the closing line shows the outcome, not the wait
                return req
            interval = min(interval * POLL_FACTOR, POLL_MAX)


def _statement_of(data: bytes) -> dict[str, Any]:
    from signing_service import bundle

    parsed = bundle.parse_bundle(data)
    envelope = parsed["dsseEnvelope"]
    if envelope.get("payloadType") != bundle.PAYLOAD_TYPE:
        raise CliError(f"the server's bundle has payloadType {envelope.get('payloadType')!r}")
    try:
        statement = json.loads(base64.b64decode(envelope.get("payload", ""), validate=True))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise CliError("the server's bundle payload is not base64 JSON") from None
    if not isinstance(statement, dict):
        raise CliError("the server's bundle payload is not a JSON object")
    return statement


def check_bundle_content(data: bytes, result: hashing.HashResult) -> None:
    """Refuse a bundle whose statement is not exactly the model that was hashed."""
    statement = _statement_of(data)
    try:
        root = statement["subject"][0]["digest"]["sha256"]
        predicate = statement["predicate"]
        signed = {(r["name"], r.get("algorithm"), r["digest"]) for r in predicate["resources"]}
        serialization = predicate["serialization"]
        ignored = set(serialization.get("ignore_paths", []))
        method = (serialization.get("method"), serialization.get("hash_type"))
        single_subject = len(statement["subject"]) == 1
    except (KeyError, IndexError, TypeError, AttributeError):
        raise CliError("the server's bundle does not hold a model_signing statement") from None
    ours = {(r.name, r.algorithm, r.digest) for r in result.resources}
    if not single_subject or root != result.root_digest or signed != ours:
        raise CliError(
            f"the server returned a bundle for different content (root digest {root}, "
            f"the model hashes to {result.root_digest}); nothing was written"
        )
    if method != ("files", "sha256"):
        raise CliError(f"the server's bundle uses serialization {method}, not files/sha256")
    if ignored != set(result.ignore_paths):
        raise CliError(
            f"the server's bundle records ignore_paths {sorted(ignored)}, "
            f"not {result.ignore_paths}; nothing was written"
        )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finish(
    client: ServiceClient,
    req: Mapping[str, Any],
    result: hashing.HashResult,
    out: Path,
    provenance: tuple[slsa.Provenance, Path] | None = None,
) -> int:
    state, rid = req.get("state"), req.get("id")
    if state in DENIED_STATES:
        reason = req.get("failure_reason")
        _error(f"signing request {rid} was {state}" + (f": {_printable(reason)}" if reason else ""))
        return EXIT_DENIED
    if state == "failed":
        _error(f"signing request {rid} failed: {_printable(req.get('failure_reason') or '-')}")
        return EXIT_ERROR
    if state != "signed":
        raise CliError(f"signing request {rid} is in an unknown state {state!r}")
    bundle_url = _link(req, "bundle")
    if not bundle_url:
        raise CliError(f"signing request {rid} is signed but has no links.bundle")
    data = client.bundle(bundle_url)
    check_bundle_content(data, result)
    provenance_data = _fetch_provenance(client, req, provenance[0]) if provenance else None
    _write_atomic(out, data)
    print(out)
    if provenance and provenance_data is not None:
        _write_atomic(provenance[1], provenance_data)
        print(provenance[1])
    return EXIT_OK


# --- sign --provenance -------------------------------------------------------------------


def _read_provenance(path: str, result: hashing.HashResult) -> slsa.Provenance:
    """The SLSA statement to send: a statement, or a DSSE envelope / Sigstore bundle holding
    one (e.g. a builder's ``.intoto.jsonl``; its signature is not ours to check), for this
    model. Checked before the upload so a wrong file fails fast, with its name."""
    from signing_service import slsa

    try:
        value = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read --provenance {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        raise CliError(f"--provenance {path} is not JSON: {exc}") from None
    value = _unwrap_envelope(value, path)
    try:
        checked = slsa.parse_statement(value, max_bytes=64 << 20)
    except slsa.ProvenanceError as exc:
        raise CliError(f"--provenance {path}: {exc}") from None
    if checked.subject_digest != result.root_digest:
        raise CliError(
            f"--provenance {path} is for other content: its subject digest is "
            f"{checked.subject_digest}, the model hashes to {result.root_digest}"
        )
    return checked


def _unwrap_envelope(value: object, path: str) -> object:
    envelope = value.get("dsseEnvelope", value) if isinstance(value, dict) else value
    if not isinstance(envelope, dict) or "payload" not in envelope:
        return value
    try:
        return json.loads(base64.b64decode(str(envelope["payload"]), validate=True))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise CliError(f"--provenance {path}: its DSSE payload is not base64 JSON") from None


def _fetch_provenance(
    client: ServiceClient, req: Mapping[str, Any], sent: slsa.Provenance
) -> bytes:
    """The provenance bundle, refused unless it signs exactly the statement that was sent."""
    from signing_service import bundle

    url = _link(req, "provenance")
    if not url:
        raise CliError(f"signing request {req.get('id')} is signed but has no links.provenance")
    data = client.bundle(url)
    envelope = bundle.parse_bundle(data)["dsseEnvelope"]
    try:
        payload = base64.b64decode(str(envelope.get("payload", "")), validate=True)
    except (ValueError, binascii.Error):
        payload = b""
    if envelope.get("payloadType") != bundle.PAYLOAD_TYPE or payload != sent.payload:
        raise CliError(
            "the server returned a provenance bundle for another statement; nothing was written"
        )
    return data


def cmd_sign(args: argparse.Namespace) -> int:
    client = _client(args.server, _credential(args))
    model, out = Path(args.path), Path(args.out)
    if not out.parent.is_dir():  # find out now, not after the service has signed
        raise CliError(f"--out {out}: directory {out.parent} does not exist")
    provenance_out = _provenance_out(args, out)
    ignores = _user_ignore_paths(model, args.ignore_paths)
    for own in (out, provenance_out):
        if own is not None and (sig := _inside_model(model, own)) is not None:
            ignores.append(sig)  # as model_signing does: the bundle is not part of the model
    result = _hash(model, ignores, quiet=args.quiet, workers=args.workers)
    if not result.resources:
        raise CliError(f"{model} has no files to sign (after ignore paths)")
    body = _request_body(args, result)
    provenance = None
    if provenance_out is not None:
        checked = _read_provenance(args.provenance, result)
        body["provenance"] = checked.statement
        provenance = (checked, provenance_out)
    import uuid  # lazily: it imports platform, which `modelsign hash` need not pay for

    req = client.submit(body, str(uuid.uuid4()), _identity_token(args))
    _info(f"submitted {body['model']} {body['version']}: {_describe(req)}", args.quiet)
    try:
        req = _wait(client, req, args.timeout, args.quiet)
    except KeyboardInterrupt:
        _error(f"interrupted; the request stays open: {_link(req, 'self') or req.get('id')}")
        return EXIT_INTERRUPTED
    return _finish(client, req, result, out, provenance)


def _provenance_out(args: argparse.Namespace, out: Path) -> Path | None:
    if not args.provenance:
        if args.provenance_out:
            raise CliError("--provenance-out needs --provenance")
        return None
    path = Path(args.provenance_out) if args.provenance_out else Path(f"{out}.provenance")
    if not path.parent.is_dir():
        raise CliError(f"--provenance-out {path}: directory {path.parent} does not exist")
    return path


def _read_manifest(path: str) -> tuple[dict[str, Any], hashing.HashResult]:
    """An OCI image manifest and the model it describes (layers as files), checked."""
    from signing_service import oci

    try:
        manifest = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the manifest {path}: {exc}") from None
    try:
        resources = oci.layer_resources(manifest, max_resources=10_000_000)
    except ManifestError as exc:
        raise CliError(f"{path}: {exc}") from None
    name = oci.model_name(manifest) or Path(path).stem
    return manifest, hashing.HashResult(
        model=name, resources=resources, ignore_paths=[], total_bytes=0
    )


def cmd_sign_oci(args: argparse.Namespace) -> int:
    """Sign an OCI model image from its manifest alone: no layer is pulled or hashed."""
    from signing_service.client.api import OCI_SIGNING_REQUESTS_PATH

    client = _client(args.server, _credential(args))
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: directory {out.parent} does not exist")
    manifest, result = _read_manifest(args.manifest)
    body: dict[str, Any] = {
        "manifest": manifest,
        "model": args.model_name or result.model,
        "version": args.model_version or os.environ.get("MODEL_VERSION") or result.root_digest[:12],
        "environment": args.environment,
    }
    if ci := ci_metadata(os.environ):
        body["ci"] = ci
    import uuid

    req = client.submit(body, str(uuid.uuid4()), path=OCI_SIGNING_REQUESTS_PATH)
    _info(
        f"submitted {body['model']} {body['version']} ({len(result.resources)} layers): {_describe(req)}",
        args.quiet,
    )
    req = _wait(client, req, args.timeout, args.quiet)
    return _finish(client, req, result, out)


def cmd_verify_oci(args: argparse.Namespace) -> int:
    """Check that a bundle signs exactly the layers of an OCI manifest."""
    data = Path(args.signature).read_bytes()
    if args.trust:
        statement = _statement_from_trust(data, args)
    else:
        statement = _statement_from_key(data, args.public_key)
    _, result = _read_manifest(args.manifest)
    signed = {r.name: r.digest for r in statement.resources}
    layers = {r.name: r.digest for r in result.resources}
    problems = [f"layer not signed: {n}" for n in sorted(layers.keys() - signed.keys())]
    problems += [
        f"signed file missing from the image: {n}" for n in sorted(signed.keys() - layers.keys())
    ]
    problems += [
        f"layer changed: {n}"
        for n in sorted(signed.keys() & layers.keys())
        if signed[n] != layers[n]
    ]
    for problem in problems:
        print(f"modelsign: {problem}", file=sys.stderr)
    if problems:
        raise CliError(f"verification failed: {len(problems)} problem(s) with {args.manifest}")
    print("Verification succeeded")
    return EXIT_OK


# --- verify ----------------------------------------------------------------------------


def _statement_from_key(bundle_data: bytes, public_key_path: str) -> VerifiedStatement:
    """Check the bundle's signature with one public key (``--public-key``)."""
    from signing_service import bundle

    try:
        key = bundle.load_public_key(Path(public_key_path).read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read --public-key {public_key_path}: {exc.strerror}") from None
    except bundle.BundleError as exc:
        raise CliError(f"--public-key {public_key_path}: {exc}") from None
    try:
        return bundle.verify_bundle(bundle_data, key)
    except bundle.VerificationError as exc:
        raise CliError(f"verification failed: {exc}") from None


def _read_trust(path: str, option: str) -> trust.TrustDocument:
    from signing_service.client import trust

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {option} {path}: {exc.strerror}") from None
    try:
        return trust.load_verified(data)
    except trust.TrustError as exc:
        raise CliError(f"{option} {path}: {exc}") from None


def _signed_at(statement: VerifiedStatement, now: datetime) -> datetime:
    """When the bundle says it was signed (signed metadata); ``now`` if it does not say."""
    from signing_service.client import trust

    value = statement.service_metadata.get("signed_at")
    if value is None:
        return now
    try:
        return trust.parse_time(value if isinstance(value, str) else "")
    except trust.TrustError:
        raise CliError(
            f"verification failed: the bundle's signed_at {value!r} is not a time"
        ) from None


def _statement_from_trust(bundle_data: bytes, args: argparse.Namespace) -> VerifiedStatement:
    """Pick the bundle's key from the trust document by hint, check the signature with it,
    then the key's state and windows at the signing time (see ``trust.check_key``)."""
    from datetime import UTC, datetime

    from signing_service import bundle
    from signing_service.client import trust

    doc = _read_trust(args.trust, "--trust")
    hint = bundle.bundle_hint(bundle.parse_bundle(bundle_data))
    if hint is None:
        raise CliError("verification failed: the bundle has no key hint (it is certificate-signed)")
    key = doc.keys.get(hint)
    if key is None:
        raise CliError(f"verification failed: the signing key {hint[:16]} is not in {args.trust}")
    try:
        statement = bundle.verify_bundle(bundle_data, key.public_key)
    except bundle.VerificationError as exc:
        raise CliError(f"verification failed: {exc}") from None
    now = args.at or datetime.now(UTC)
    signed_at = _signed_at(statement, now)
    try:
        trust.check_key(doc, hint, signed_at, now)
    except trust.TrustError as exc:
        raise CliError(f"verification failed: {exc}") from None
    _check_authority(statement, key)
    _info(f"signed by {key.name} ({key.state}) at {trust.format_time(signed_at)}", args.quiet)
    return statement


def _check_authority(statement: VerifiedStatement, key: trust.TrustKey) -> None:
    # The signed metadata names the authority; a key of another authority must not pass
    # for it (a staging key vouching for a "production" bundle).
    claimed = statement.service_metadata.get("authority")
    if claimed is not None and claimed != key.authority:
        raise CliError(
            f"verification failed: the bundle says authority {_printable(claimed)!r} "
            f"but {key.name} belongs to {key.authority!r}"
        )


def model_problems(
    model: Path,
    statement: VerifiedStatement,
    extra_ignores: Sequence[str],
    *,
    quiet: bool = True,
    workers: int | None = None,
) -> list[str]:
    """Re-hash the model as the signer did and list every difference, one line each."""
    ignores = [*statement.ignore_paths, *extra_ignores]
    hashed = _hash(model, ignores, quiet=quiet, workers=workers)
    actual = {r.name: r.digest for r in hashed.resources}
    signed = {r.name: r.digest for r in statement.resources}
    problems = [f"extra file (not in the signature): {n}" for n in sorted(actual.keys() - signed)]
    problems += [f"missing file (in the signature): {n}" for n in sorted(signed.keys() - actual)]
    problems += [
        f"changed file: {n}: signed digest {signed[n]}, file digest {actual[n]}"
        for n in sorted(signed.keys() & actual.keys())
        if signed[n] != actual[n]
    ]
    return problems


def cmd_verify(args: argparse.Namespace) -> int:
    if args.deployment:
        return _verify_deployment(args)
    if args.mode != "strict" or args.json or args.provenance_signature:
        raise CliError("--mode, --json and --provenance-signature apply with --deployment")
    model, signature = Path(args.path), Path(args.signature)
    try:
        data = signature.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read --signature {signature}: {exc.strerror}") from None
    if args.at is not None and not args.trust:
        raise CliError("--at only applies with --trust")
    if args.trust:
        statement = _statement_from_trust(data, args)
    else:
        statement = _statement_from_key(data, args.public_key)
    extra = _user_ignore_paths(model, args.ignore_paths)
    if (sig := _inside_model(model, signature)) is not None:
        extra.append(sig)
    problems = model_problems(model, statement, extra, quiet=args.quiet, workers=args.workers)
    for problem in problems:
        print(f"modelsign: {problem}", file=sys.stderr)
    if problems:
        raise CliError(f"verification failed: {len(problems)} problem(s) with {model}")
    print("Verification succeeded")
    return EXIT_OK


EXIT_REJECTED = 3


def _verify_deployment(args: argparse.Namespace) -> int:
    """The deployment gate: policy checks, one line each, then the verdict (0 accept, 3 reject)."""
    from datetime import UTC, datetime

    from signing_service.client import gate, trust

    if not args.trust:
        raise CliError("--deployment needs --trust (the policy comes from the trust document)")
    model, signature = Path(args.path), Path(args.signature)
    data = signature.read_bytes() if signature.is_file() else None
    provenance = None
    if args.provenance_signature:
        provenance = _read_input(args.provenance_signature, "--provenance-signature")
    doc = _read_trust(args.trust, "--trust")
    extra = _user_ignore_paths(model, args.ignore_paths)
    for own in (args.signature, args.provenance_signature):
        if own and (sig := _inside_model(model, Path(own))) is not None:
            extra.append(sig)

    def rehash(statement: VerifiedStatement) -> Sequence[str]:
        return model_problems(
            model, statement, extra, quiet=args.quiet or args.json, workers=args.workers
        )

    try:
        verdict = gate.evaluate(
            doc,
            args.deployment,
            data,
            mode=args.mode,
            now=args.at or datetime.now(UTC),
            rehash=rehash,
            provenance_data=provenance,
        )
    except trust.TrustError as exc:
        raise CliError(str(exc)) from None
    _print_verdict(verdict, args.json)
    return EXIT_OK if verdict.accepted else EXIT_REJECTED


def _print_verdict(verdict: gate.Verdict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(verdict.to_json(), indent=2))
        return
    for check in verdict.checks:
        print(f"{'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    failed = len(verdict.failed)
    if verdict.accepted and failed:
        print(f"ACCEPT for {verdict.deployment} (warn mode: {failed} check(s) failed)")
    elif verdict.accepted:
        print(f"ACCEPT for {verdict.deployment}")
    else:
        print(f"REJECT for {verdict.deployment}: {failed} check(s) failed")


# --- bom -------------------------------------------------------------------------------


def _read_input(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {option} {path}: {exc.strerror}") from None


def _bom_statement(data: bytes, args: argparse.Namespace) -> tuple[VerifiedStatement, str]:
    """The bundle's statement, and how its signature was checked (see bom.Signature.check)."""
    from signing_service import bundle

    if args.public_key:
        statement = _statement_from_key(data, args.public_key)
        return statement, f"verified with public key sha256:{statement.hint or '-'}"
    if args.trust:
        statement = _statement_from_trust(data, args)
        version = _read_trust(args.trust, "--trust").version
        return statement, f"verified with trust document version {version}"
    try:
        statement = bundle.unsafe_read_statement(data)
    except bundle.VerificationError as exc:
        raise CliError(f"--signature {args.signature}: {exc}") from None
    _warn("the bundle's signature is not checked; give --public-key or --trust to check it")
    return statement, "not checked"


def cmd_bom(args: argparse.Namespace) -> int:
    """A CycloneDX 1.6 ML-BOM of a model, refused unless its files match the signature."""
    from signing_service.client import bom

    model = Path(args.path)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise CliError(f"-o {out}: directory {out.parent} does not exist")
    data = _read_input(args.signature, "--signature")
    statement, check = _bom_statement(data, args)
    signature = bom.read_signature(data, Path(args.signature).name, statement, check)
    provenance = None
    if args.provenance:
        raw = _read_input(args.provenance, "--provenance")
        provenance = bom.read_provenance(raw, Path(args.provenance).name)
    bom.check_provenance(provenance, statement)  # before an hour of hashing
    extra = _user_ignore_paths(model, args.ignore_paths)
    for own in (args.signature, args.provenance, args.out):  # our own files are not the model
        if own and (rel := _inside_model(model, Path(own))) is not None:
            extra.append(rel)
    problems = model_problems(model, statement, extra, quiet=args.quiet, workers=args.workers)
    for problem in problems:
        print(f"modelsign: {problem}", file=sys.stderr)
    if problems:
        raise CliError(
            f"{model} does not match the signature ({len(problems)} problem(s)); no BOM written"
        )
    text = bom.render(bom.build_bom(signature, provenance))
    if out is None:
        sys.stdout.write(text)
    else:
        _write_atomic(out, text.encode("utf-8"))
        _info(f"wrote {out}: {len(statement.resources)} files, {check}", args.quiet)
    return EXIT_OK


# --- public-key ------------------------------------------------------------------------


def _pick_key(keys: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> Mapping[str, Any]:
    if args.signature:
        from signing_service import bundle

        hint = bundle.bundle_hint(bundle.parse_bundle(Path(args.signature).read_bytes()))
        if hint is None:
            raise CliError(f"{args.signature} has no key hint (it is certificate-signed)")
        matches = [k for k in keys if k.get("hint") == hint]
        wanted = f"the key with hint {hint}"
    else:
        env = args.environment
        matches = [k for k in keys if k.get("authority") == env and k.get("state") == "active"]
        wanted = f"an active key for environment {env!r}"
    if len(matches) != 1:
        found = "no" if not matches else str(len(matches))
        raise CliError(f"the server publishes {found} key(s) matching {wanted}")
    return matches[0]


def cmd_public_key(args: argparse.Namespace) -> int:
    from signing_service import bundle

    entry = _pick_key(_client(args.server, None).keys(), args)
    pem = entry.get("public_key_pem")
    key = bundle.load_public_key(pem if isinstance(pem, str) else "")
    if bundle.key_hint(key) != entry.get("hint"):  # do not trust the listed hint blindly
        raise CliError(f"key {entry.get('id')}: its PEM does not match its hint")
    text = bundle.public_key_pem(key)
    if args.out:
        Path(args.out).write_text(text, encoding="ascii")
        print(args.out)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    """The newest valid signature of MODEL at VERSION: picks up re-signed bundles."""
    from urllib.parse import urlencode

    from signing_service import bundle

    client = _client(args.server, _credential(args))
    query = urlencode(
        {"model": args.model, "version": args.model_version, "state": "valid", "limit": 1}
    )
    listing = client.get(f"/api/v1/signatures/?{query}")
    results = listing.get("results") or []
    if not results:
        raise CliError(
            f"no valid signature of {args.model} {args.model_version} that this token can see"
        )
    newest = results[0]
    data = client.bundle(newest["links"]["bundle"])
    bundle.parse_bundle(data)  # refuse to write something that is not a bundle
    Path(args.out).write_bytes(data)
    key = newest.get("key") or newest.get("signer_identity")
    print(f"{args.out}: signature {newest['id']} by {key}, signed {newest['signed_at']}")
    return EXIT_OK


# --- trust fetch -----------------------------------------------------------------------


def _trust_anchors(args: argparse.Namespace, doc: trust.TrustDocument) -> set[str]:
    """Hints of the keys the caller already trusts (or, on first use, the signers)."""
    from datetime import UTC, datetime

    from signing_service.client import trust

    if args.pin_key:
        return trust.pinned_hints(_read_pins(args.pin_key))
    if args.previous:
        previous = _read_trust(args.previous, "--previous")
        trust.check_not_older(previous, doc)
        return trust.previous_anchors(previous, datetime.now(UTC))
    if not args.trust_on_first_use:
        raise CliError(
            "nothing to check the trust document against: give --pin-key PEM (a signing key "
            "you got out of band) or --previous trust.json, or --trust-on-first-use"
        )
    signers = trust.signers(doc)
    for key in signers:  # print them so they can be checked against what the operator says
        print(f"modelsign: trusting on first use: {key.name}: sha256:{key.hint}", file=sys.stderr)
    return {key.hint for key in signers}


def _read_pins(paths: Sequence[str]) -> list[bytes]:
    pins = []
    for path in paths:
        try:
            pins.append(Path(path).read_bytes())
        except OSError as exc:
            raise CliError(f"cannot read --pin-key {path}: {exc.strerror}") from None
    return pins


def cmd_trust_fetch(args: argparse.Namespace) -> int:
    from signing_service.client import trust

    out = Path(args.out)
    if not out.parent.is_dir():
        raise CliError(f"--out {out}: directory {out.parent} does not exist")
    data = trust.fetch(_client(args.server, None))
    try:
        doc = trust.load_verified(data, "the server's trust document")
        trusted = trust.trusted_signers(doc, _trust_anchors(args, doc))
    except trust.TrustError as exc:
        raise CliError(f"refusing the trust document: {exc}; nothing was written") from None
    _write_atomic(out, data)  # as fetched: it can be re-verified offline
    names = ", ".join(k.name for k in trusted)
    _info(
        f"trust document version {doc.version} ({len(doc.keys)} keys), signed by {names}",
        args.quiet,
    )
    print(out)
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return number


def _hashing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="model directory or single model file")
    p.add_argument(
        "--ignore-paths",
        nargs="+",
        action="extend",
        default=[],
        metavar="P",
        help="paths to leave out, relative to the current directory (as with model_signing)",
    )
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true")
    p.add_argument("--workers", type=int, default=None, help="hashing threads (default: CPUs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelsign", description="Sign and verify ML models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("hash", "print a model's resource list as JSON", cmd_hash),
        ("sign", "hash a model, have the service sign it, write the bundle", cmd_sign),
        ("verify", "verify a model against a bundle and a public key or trust file", cmd_verify),
        ("public-key", "fetch a signing public key from the service", cmd_public_key),
        ("fetch", "download the latest valid bundle of a model version", cmd_fetch),
        (
            "sign-oci",
            "sign an OCI model image from its manifest (no layer is pulled)",
            cmd_sign_oci,
        ),
        ("verify-oci", "check a bundle against an OCI image manifest", cmd_verify_oci),
        ("bom", "write a CycloneDX ML-BOM of a signed model (its files re-hashed)", cmd_bom),
        ("trust", "fetch the service's signed trust document", _trust_usage),
    ]
    parsers = {name: sub.add_parser(name, help=text) for name, text, _ in commands}
    for name, _, func in commands:
        parsers[name].set_defaults(func=func)
    for name in ("hash", "sign", "verify", "bom"):
        _hashing_options(parsers[name])
    _bom_options(parsers["bom"])
    parsers["hash"].add_argument(
        "--cache", action="store_true",
        help="reuse digests of files whose size, mtime and inode are unchanged since the last --cache run",
    )  # fmt: skip
    parsers["hash"].add_argument(
        "--cache-file", help="where --cache keeps its digests (implies --cache)"
    )
    _sign_options(parsers["sign"])
    parsers["sign"].add_argument(
        "--provenance",
        metavar="FILE",
        help="the model's SLSA v1 provenance (in-toto statement JSON, or a DSSE envelope of "
        "one) to have signed with it, as a second bundle",
    )
    parsers["sign"].add_argument(
        "--provenance-out",
        metavar="PATH",
        help="with --provenance: where to write the provenance bundle "
        "(default: the --out path + .provenance)",
    )
    _verify_options(parsers["verify"])
    _trust_options(parsers["trust"])
    pk = parsers["public-key"]
    pk.add_argument("--server", required=True, help="service URL")
    which = pk.add_mutually_exclusive_group(required=True)
    which.add_argument("--environment", help="the active key of this authority")
    which.add_argument("--signature", help="the key that signed this bundle (by its hint)")
    pk.add_argument("--out", help="write the PEM here (default: stdout)")
    oci_sign = parsers["sign-oci"]
    oci_sign.add_argument("manifest", help="the image manifest JSON (`skopeo inspect --raw`)")
    oci_sign.add_argument("--quiet", action="store_true")
    _sign_options(oci_sign)
    oci_verify = parsers["verify-oci"]
    oci_verify.add_argument("manifest", help="the image manifest JSON (`skopeo inspect --raw`)")
    oci_verify.add_argument("--signature", required=True, help="the bundle")
    oci_verify.add_argument("--quiet", action="store_true")
    oci_verify.add_argument("--at", default=None, help=argparse.SUPPRESS)
    which = oci_verify.add_mutually_exclusive_group(required=True)
    which.add_argument("--public-key", help="PEM public key of the signer")
    which.add_argument("--trust", help="trust document from `modelsign trust fetch`")
    fetch = parsers["fetch"]
    fetch.add_argument("--server", required=True, help="service URL")
    _credential_options(fetch)
    fetch.add_argument("--model", required=True, help="model name as signed")
    fetch.add_argument("--model-version", required=True, help="model version as signed")
    fetch.add_argument("--out", default="model.sig", help="where to write it (model.sig)")
    return parser


def _verify_options(p: argparse.ArgumentParser) -> None:
    def when(text: str) -> datetime:
        # Imported when a time is given: every command builds this parser (10 ms at start-up).
        from signing_service.client.trust import TrustError, parse_time

        try:
            return parse_time(text)
        except TrustError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    p.add_argument("--signature", required=True, help="the bundle (model.sig)")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", help="PEM public key of the signer")
    key.add_argument("--trust", help="trust document from `modelsign trust fetch`")
    p.add_argument(
        "--deployment", help="with --trust: judge against this deployment's verification policy"
    )
    p.add_argument(
        "--mode",
        choices=("strict", "warn", "permissive"),
        default="strict",
        help="with --deployment: warn reports and accepts; permissive accepts unsigned models",
    )
    p.add_argument("--json", action="store_true", help="with --deployment: the verdict as JSON")
    p.add_argument(
        "--provenance-signature",
        metavar="PATH",
        help="with --deployment: also check the model's provenance bundle "
        "(written by `modelsign sign --provenance`, model.sig.provenance)",
    )
    p.add_argument(
        "--at",
        type=when,
        help="with --trust: judge key windows at this ISO 8601 time (UTC if no offset; default now)",
    )


def _bom_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--signature", required=True, help="the model's bundle (model.sig)")
    p.add_argument("--provenance", help="SLSA v1 provenance of the model, as a Sigstore bundle")
    p.add_argument("-o", "--out", help="write the BOM here (default: stdout)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--public-key", help="also check the bundle's signature with this PEM key")
    key.add_argument("--trust", help="also check the bundle's signature with this trust document")
    p.set_defaults(at=None)  # --trust judges key windows now


def _trust_usage(args: argparse.Namespace) -> int:
    # Unreachable (a subcommand is required); keeps the command table uniform.
    raise CliError("usage: modelsign trust fetch --server URL [--out trust.json] ...")


def _trust_options(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="trust_command", required=True, metavar="SUBCOMMAND")
    fetch = sub.add_parser("fetch", help="fetch and check the trust document; write it as fetched")
    fetch.set_defaults(func=cmd_trust_fetch)
    fetch.add_argument("--server", required=True, help="service URL")
    fetch.add_argument("--out", default="trust.json", help="where to write it (trust.json)")
    fetch.add_argument("--quiet", action="store_true")
    anchor = fetch.add_mutually_exclusive_group()
    anchor.add_argument(
        "--pin-key", nargs="+", action="extend", metavar="PEM", help="signing public keys you trust"
    )
    anchor.add_argument(
        "--previous", help="a trust document fetched before: trust its active and transition keys"
    )
    anchor.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="first use only: trust whichever active keys signed it (prints their fingerprints)",
    )


def _identity_token(args: argparse.Namespace) -> str | None:
    """The OIDC token a keyless authority hands to Fulcio; never printed."""
    path = getattr(args, "identity_token_file", None)
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise CliError(f"cannot read --identity-token-file: {exc.strerror}") from None
    return os.environ.get("SIGSTORE_ID_TOKEN") or None


def _credential_options(p: argparse.ArgumentParser) -> None:
    """--token / --token-file / --oidc and the --oidc-* details (see :func:`_credential`)."""
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="API token (prefer MODELSIGN_TOKEN or --token-file)")
    token.add_argument("--token-file", help="file holding the API token")
    token.add_argument(
        "--oidc",
        action="store_true",
        help="authenticate with the CI job's OIDC ID token instead of an API token "
        "(GitHub Actions: id-token: write; GitLab: id_tokens)",
    )
    p.add_argument(
        "--oidc-audience",
        help="--oidc on GitHub: the audience to ask for "
        "(default: $MODELSIGN_OIDC_AUDIENCE, else the --server URL)",
    )
    p.add_argument(
        "--oidc-token-env",
        default="MODELSIGN_ID_TOKEN",
        help="--oidc: the variable holding the ID token (GitLab id_tokens; default: %(default)s)",
    )
    p.add_argument("--oidc-token-file", help="--oidc: a file holding the ID token")


def _sign_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="service URL, e.g. https://sign.example.com")
    p.add_argument("--environment", required=True, help="signing environment (authority)")
    _credential_options(p)
    p.add_argument(
        "--identity-token-file",
        help="keyless authorities: file with the job's OIDC identity token for Sigstore "
        "(default: $SIGSTORE_ID_TOKEN)",
    )
    p.add_argument("--out", default="model.sig", help="bundle to write (default: model.sig)")
    p.add_argument("--model-name", help="model name (default: the model path's name)")
    p.add_argument(
        "--model-version", help="version (default: $MODEL_VERSION, else the root digest's 12 hex)"
    )
    p.add_argument(
        "--timeout", type=_positive, default=3600.0, help="seconds to wait for signing (3600)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not isinstance(exc, _expected_errors()):
            raise
        _error(str(exc))
        return exc.exit_code if isinstance(exc, CliError) else EXIT_ERROR
