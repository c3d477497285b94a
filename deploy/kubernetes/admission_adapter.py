#!/usr/bin/env python3
"""A Kubernetes validating admission webhook for signed models.

For each Pod or Deployment (or other pod-template workload) that names a model, it asks
the signing service's deployment gate, ``POST /api/v1/verify/``, and answers the API server
with the service's verdict and reasons. Standard library plus the `modelsign` client
(``pip install modelsign-service``); no Django. See README.md next to it.

Annotations (on a Deployment: on the Deployment itself or on its pod template, which the
Deployment's Pods carry; the two must agree):

``models.example.com/deployment``
    the deployment environment of the verification policy, e.g. ``production_deployment``;
    it must be one the adapter was started with (``--allow-deployment``)
``models.example.com/bundle-url``
    where the model's bundle is; only URLs under a ``--bundle-url-prefix`` are fetched.
    Without it the model counts as unsigned and the policy decides
``models.example.com/model-digest``
    optional: the model's root digest (``modelsign hash``), e.g. checked again by an init
    container; the bundle must sign exactly that model

Decisions, failing closed:

* no ``models.example.com/`` annotation: allowed as "not a model workload", unless
  ``--require-model``;
* the service accepts: allowed (``--mode warn``: allowed, failed checks as warnings);
* the service rejects: denied, with each failed check;
* an annotation the adapter refuses, a bundle it cannot fetch, a service it cannot reach:
  denied, with the reason.

The mode is the operator's (``--mode``), never the workload's: an annotation must not be
able to turn the gate off.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from signing_service import bundle
from signing_service.client.api import ClientError, ServiceClient

log = logging.getLogger("modelsign.admission")

DEFAULT_PREFIX = "models.example.com/"
MAX_REVIEW_BYTES = 4 << 20  # the API server's own request limit is about 3 MiB
SERVICE_TIMEOUT = 5.0  # the webhook's timeoutSeconds (10) must cover a fetch and a verify
MODES = ("strict", "warn", "permissive")
ANNOTATIONS = frozenset({"deployment", "bundle-url", "model-digest"})


class Refused(Exception):
    """The workload is denied before the service is asked; the message says why."""


@dataclass(frozen=True)
class Config:
    service: ServiceClient
    allowed_deployments: frozenset[str]
    bundle_url_prefixes: tuple[str, ...]
    mode: str = "strict"
    require_model: bool = False
    annotation_prefix: str = DEFAULT_PREFIX


# --- the decision ----------------------------------------------------------------------


def review(body: Mapping[str, Any], config: Config) -> dict[str, Any]:
    """Answer one ``admission.k8s.io/v1`` AdmissionReview (raises ValueError if malformed)."""
    request = body.get("request")
    if body.get("kind") != "AdmissionReview" or not isinstance(request, dict):
        raise ValueError("not an AdmissionReview with a request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ValueError("the AdmissionReview request has no uid")
    try:
        allowed, message, warnings = _decide(request, config)
    except Refused as exc:
        allowed, message, warnings = False, str(exc), []
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": message}
    if warnings:
        response["warnings"] = warnings
    kind = _dict(request.get("kind")).get("kind", "?")
    where = f"{request.get('namespace') or '-'}/{request.get('name') or '-'}"
    log.info("%s %s %s: %s: %s", uid, kind, where, "allowed" if allowed else "denied", message)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def _decide(request: Mapping[str, Any], config: Config) -> tuple[bool, str, list[str]]:
    obj = request.get("object")
    if not isinstance(obj, dict):  # DELETE and CONNECT carry no object
        return True, "no object to check", []
    wanted = model_annotations(obj, config.annotation_prefix)
    if not wanted:
        if config.require_model:
            raise Refused(
                f"no {config.annotation_prefix} annotations: every workload here names its model"
            )
        return True, "not a model workload", []
    if unknown := sorted(wanted.keys() - ANNOTATIONS):  # a typo must not skip a check
        names = ", ".join(config.annotation_prefix + n for n in unknown)
        raise Refused(f"unknown annotation {names}")
    deployment = _deployment(wanted, config)
    url = wanted.get("bundle-url")
    data = fetch_bundle(url, config) if url else None
    _check_digest(wanted.get("model-digest"), data, url)
    payload: dict[str, Any] = {"deployment": deployment, "mode": config.mode}
    if data is not None:
        payload["bundle"] = data
    try:
        verdict = config.service.verify(payload)
    except ClientError as exc:
        raise Refused(f"the signing service could not judge the model: {exc}") from None
    return _answer(verdict, deployment)


def model_annotations(obj: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """Our annotations (prefix removed) of the object and of its pod template, if any."""
    found: dict[str, str] = {}
    template = _dict(_dict(obj.get("spec")).get("template"))
    for where, source in (("the object", obj), ("its pod template", template)):
        annotations = _dict(_dict(source.get("metadata")).get("annotations"))
        for key, value in annotations.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if name in found and found[name] != value:
                raise Refused(f"{key} differs between the object and {where}")
            found[name] = str(value)
    return found


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _deployment(wanted: Mapping[str, str], config: Config) -> str:
    name = wanted.get("deployment")
    if name is None and len(config.allowed_deployments) == 1:
        return next(iter(config.allowed_deployments))
    if name is None:
        raise Refused(f"the model has no {config.annotation_prefix}deployment annotation")
    if name not in config.allowed_deployments:
        allowed = ", ".join(sorted(config.allowed_deployments))
        raise Refused(f"deployment {name!r} is not judged here (allowed: {allowed})")
    return name


def fetch_bundle(url: str, config: Config) -> dict[str, Any]:
    """GET the bundle, only from an allowed prefix: pod authors must not make the webhook
    fetch arbitrary (internal) URLs."""
    _check_url(url, config.bundle_url_prefixes)
    parts = urlsplit(url)
    try:
        origin = ServiceClient(
            f"{parts.scheme}://{parts.netloc}", timeout=SERVICE_TIMEOUT, retries=1
        )
        data = origin.bundle(url)  # same origin only, no redirects, size-limited
        return bundle.parse_bundle(data)
    except ClientError as exc:
        raise Refused(f"cannot fetch the bundle {url}: {exc}") from None
    except bundle.BundleError as exc:
        raise Refused(f"{url} is not a model bundle: {exc}") from None


def _check_url(url: str, prefixes: Sequence[str]) -> None:
    parts = urlsplit(url)
    segments = unquote(parts.path).split("/")
    if (
        parts.scheme not in ("http", "https")
        or parts.username is not None
        or parts.password is not None
        or "." in segments
        or ".." in segments
        or "\\" in url
        or not any(url.startswith(p) for p in prefixes)
    ):
        raise Refused(f"bundle URL {url!r} is not under an allowed prefix ({', '.join(prefixes)})")


def _check_digest(digest: str | None, data: Mapping[str, Any] | None, url: str | None) -> None:
    """The bundle must sign the model the workload says it runs (the service checks the
    signature over this same statement, so reading it unverified here is enough)."""
    if digest is None:
        return
    if data is None:
        raise Refused("a model-digest annotation needs a bundle-url annotation")
    try:
        signed = bundle.unsafe_read_statement(data).root_digest
    except bundle.BundleError as exc:
        raise Refused(f"{url} is not a model bundle: {exc}") from None
    if digest.removeprefix("sha256:").lower() != signed:
        raise Refused(f"the bundle signs model {signed}, not the annotated {digest}")


def _answer(verdict: Mapping[str, Any], deployment: str) -> tuple[bool, str, list[str]]:
    checks = verdict.get("checks")
    checks = checks if isinstance(checks, list) else []
    failed = [
        f"{c.get('name')}: {c.get('detail')}"
        for c in checks
        if isinstance(c, dict) and not c.get("ok")
    ]
    if verdict.get("verdict") == "accept":
        return True, f"accepted for {deployment}", [f"model check failed: {f}" for f in failed]
    if verdict.get("verdict") != "reject":
        raise Refused(f"the signing service answered without a verdict for {deployment}")
    return (
        False,
        f"model rejected for {deployment}: " + "; ".join(failed or ["no reason given"]),
        [],
    )


# --- the HTTP server -------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    config: Config  # set by make_server
    server_version = "modelsign-admission/1"
    timeout = 15  # seconds per socket read: a stalled client cannot hold a thread

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(HTTPStatus.OK, {"status": "ok"})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/validate":
            self._send(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return
        if not 0 < length <= MAX_REVIEW_BYTES:
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "bad body size"})
            return
        try:
            answer = review(json.loads(self.rfile.read(length)), self.config)
        except (ValueError, AttributeError, RecursionError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"bad AdmissionReview: {exc}"})
            return
        self._send(HTTPStatus.OK, answer)

    def _send(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # decisions are logged instead
        return


def make_server(
    config: Config,
    host: str = "0.0.0.0",  # noqa: S104 -- the API server reaches the pod on its IP
    port: int = 8443,
    tls: ssl.SSLContext | None = None,
) -> ThreadingHTTPServer:
    handler = type("ConfiguredHandler", (Handler,), {"config": config})
    server = ThreadingHTTPServer((host, port), handler)
    if tls is not None:
        # Handshake in the request's thread, not in accept(): a slow client blocks no one.
        server.socket = tls.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    return server


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--service", required=True, help="signing service URL (https://...)")
    p.add_argument("--allow-deployment", action="append", required=True, metavar="NAME",
                   help="a verification-policy deployment workloads may name (repeatable; "
                        "with one, the annotation may be left out)")  # fmt: skip
    p.add_argument("--bundle-url-prefix", action="append", required=True, metavar="URL",
                   help="bundles are fetched only under this prefix, e.g. "
                        "https://models.example.com/bundles/ (repeatable)")  # fmt: skip
    p.add_argument("--mode", choices=MODES, default="strict")
    p.add_argument("--require-model", action="store_true",
                   help="deny workloads with no model annotations")  # fmt: skip
    p.add_argument("--annotation-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--listen", default="0.0.0.0:8443", help="host:port (0.0.0.0:8443)")
    p.add_argument("--tls-cert", help="server certificate (PEM); the API server requires TLS")
    p.add_argument("--tls-key", help="its private key (PEM)")
    args = p.parse_args(argv)
    for prefix in args.bundle_url_prefix:
        parts = urlsplit(prefix)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or not parts.path.endswith("/")
        ):
            p.error(f"--bundle-url-prefix {prefix!r}: must be http(s)://host/path/ ending in /")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("give both --tls-cert and --tls-key")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config = Config(
        service=ServiceClient(args.service, timeout=SERVICE_TIMEOUT, retries=1),
        allowed_deployments=frozenset(args.allow_deployment),
        bundle_url_prefixes=tuple(args.bundle_url_prefix),
        mode=args.mode,
        require_model=args.require_model,
        annotation_prefix=args.annotation_prefix,
    )
    host, _, port = args.listen.rpartition(":")
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    server = make_server(config, host.strip("[]") or "0.0.0.0", int(port), tls)  # noqa: S104
    log.info("listening on %s (%s)", args.listen, "TLS" if tls else "plain HTTP: tests only")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
