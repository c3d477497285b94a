"""The deployment gate: a model, its bundle and a trust document, judged against one
deployment environment's verification policy, offline.

Every check yields a :class:`Check`; the verdict depends on the mode:

* ``strict``: any failed check rejects;
* ``warn``: failures are reported, the model is accepted;
* ``permissive``: an unsigned model is accepted; a signature that is present must pass.

Checks, in order: signature present; bundle signature by a key the trust document lists;
the key's state and windows at the signing time; authority accepted by the deployment;
signature age; provenance (when required); the provenance bundle (when one is given: signed
by a trusted key of the model's authority, the very statement the model's signature names,
for the model's root digest); approvals (the authority's count, distinct approvers in the
signed statement); the model's files re-hashed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from signing_service import bundle, slsa
from signing_service.client import trust

MODES = ("strict", "warn", "permissive")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Verdict:
    deployment: str
    mode: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def accepted(self) -> bool:
        return self.mode == "warn" or not self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "accept" if self.accepted else "reject",
            "deployment": self.deployment,
            "mode": self.mode,
            "checks": [asdict(c) for c in self.checks],
        }


def rule_for(doc: trust.TrustDocument, deployment: str) -> dict[str, Any]:
    rule = doc.verification_policy.get(deployment)
    if not isinstance(rule, dict):
        known = ", ".join(sorted(doc.verification_policy)) or "none"
        raise trust.TrustError(
            f"the trust document has no deployment {deployment!r} (known: {known})"
        )
    return rule


def evaluate(
    doc: trust.TrustDocument,
    deployment: str,
    bundle_data: bytes | None,
    *,
    mode: str,
    now: datetime,
    rehash: Callable[[bundle.VerifiedStatement], Sequence[str]],
    provenance_data: bytes | None = None,
) -> Verdict:
    """Run the checks; ``rehash`` returns the model's problems against a verified statement.

    ``provenance_data``: the model's provenance bundle, checked too when given.
    """
    rule = rule_for(doc, deployment)
    verdict = Verdict(deployment, mode)
    add = verdict.checks.append
    if bundle_data is None:
        allowed = mode == "permissive" or not rule.get("require_signature", True)
        why = "allowed by " + ("--mode permissive" if mode == "permissive" else "the policy")
        add(
            Check(
                "signature present",
                allowed,
                why if allowed else f"{deployment} requires a signature",
            )
        )
        return verdict
    add(Check("signature present", True, "bundle given"))
    statement, key = _signature(doc, bundle_data, add)
    if statement is None or key is None:
        return verdict
    signed_at = _signed_at(statement, now)
    _key_state(doc, key, signed_at, now, add)
    _authority(rule, statement, key, add)
    _age(rule, signed_at, now, add)
    _provenance(rule, statement, add)
    if provenance_data is not None:
        add(_provenance_bundle(doc, key, statement, provenance_data, signed_at, now))
    _approvals(doc, key.authority, statement, add)
    problems = rehash(statement)
    add(
        Check(
            "model files", not problems, "; ".join(problems) if problems else "every file matches"
        )
    )
    return verdict


def _signature(
    doc: trust.TrustDocument, data: bytes, add: Callable[[Check], None]
) -> tuple[bundle.VerifiedStatement | None, trust.TrustKey | None]:
    try:
        hint = bundle.bundle_hint(bundle.parse_bundle(data))
    except bundle.BundleError as exc:
        add(Check("bundle signature", False, str(exc)))
        return None, None
    key = doc.keys.get(hint or "")
    if key is None:
        what = (
            "has no key hint"
            if hint is None
            else f"is signed by {hint[:16]}, which the trust document does not list"
        )
        add(Check("bundle signature", False, f"the bundle {what}"))
        return None, None
    try:
        statement = bundle.verify_bundle(data, key.public_key)
    except bundle.VerificationError as exc:
        add(Check("bundle signature", False, str(exc)))
        return None, None
    add(Check("bundle signature", True, f"valid, by {key.name}"))
    return statement, key


def _signed_at(statement: bundle.VerifiedStatement, now: datetime) -> datetime:
    value = statement.service_metadata.get("signed_at")
    try:
        return trust.parse_time(value) if isinstance(value, str) else now
    except trust.TrustError:
        return now


def _key_state(
    doc: trust.TrustDocument,
    key: trust.TrustKey,
    signed_at: datetime,
    now: datetime,
    add: Callable[[Check], None],
) -> None:
    try:
        trust.check_key(doc, key.hint, signed_at, now)
    except trust.TrustError as exc:
        add(Check("key state", False, str(exc)))
        return
    add(Check("key state", True, f"{key.state} at {trust.format_time(signed_at)}"))


def _authority(
    rule: dict[str, Any],
    statement: bundle.VerifiedStatement,
    key: trust.TrustKey,
    add: Callable[[Check], None],
) -> None:
    accepted = list(rule.get("accepted_authorities", []))
    claimed = statement.service_metadata.get("authority", key.authority)
    if claimed != key.authority:
        add(
            Check(
                "authority",
                False,
                f"the bundle claims {claimed!r} but the key belongs to {key.authority!r}",
            )
        )
    elif key.authority not in accepted:
        add(
            Check(
                "authority",
                False,
                f"{key.authority!r} is not accepted here (accepted: {', '.join(accepted)})",
            )
        )
    else:
        add(Check("authority", True, f"{key.authority!r} is accepted"))


def _age(
    rule: dict[str, Any], signed_at: datetime, now: datetime, add: Callable[[Check], None]
) -> None:
    limit = rule.get("max_signature_age_days")
    age = now - signed_at
    if limit is None:
        add(Check("signature age", True, f"{age.days} days; no limit"))
    elif age > timedelta(days=int(limit)):
        add(Check("signature age", False, f"{age.days} days old; the limit is {limit} days"))
    else:
        add(Check("signature age", True, f"{age.days} days old (limit {limit})"))


def _provenance(
    rule: dict[str, Any], statement: bundle.VerifiedStatement, add: Callable[[Check], None]
) -> None:
    if not rule.get("require_provenance"):
        add(Check("provenance", True, "not required"))
        return
    provenance = statement.service_metadata.get("provenance")
    if not isinstance(provenance, dict):
        add(Check("provenance", False, "required, but the signed statement carries no provenance"))
        return
    digest = provenance.get("subject_digest")
    if digest != statement.root_digest:
        add(
            Check(
                "provenance", False, "the provenance is for other content (subject digest differs)"
            )
        )
        return
    add(Check("provenance", True, f"builder {provenance.get('builder_id', '?')}"))


def _provenance_bundle(
    doc: trust.TrustDocument,
    model_key: trust.TrustKey,
    statement: bundle.VerifiedStatement,
    data: bytes,
    signed_at: datetime,
    now: datetime,
) -> Check:
    """The provenance bundle: by a trusted key of the model's authority, valid when the model
    was signed, the statement the model's signature names, and for the model's content."""
    name = "provenance bundle"
    try:
        hint = bundle.bundle_hint(bundle.parse_bundle(data))
    except bundle.BundleError as exc:
        return Check(name, False, str(exc))
    key = doc.keys.get(hint or "")
    if key is None:
        what = "has no key hint" if hint is None else f"is signed by {hint[:16]}, not listed"
        return Check(name, False, f"the provenance bundle {what} in the trust document")
    if key.authority != model_key.authority:
        return Check(
            name,
            False,
            f"signed by {key.name} of {key.authority!r}; the model by {model_key.authority!r}",
        )
    try:
        verified = slsa.verify_bundle(data, key.public_key)
        trust.check_key(doc, key.hint, signed_at, now)
    except (slsa.ProvenanceError, trust.TrustError) as exc:
        return Check(name, False, str(exc))
    named = statement.service_metadata.get("provenance")
    if not isinstance(named, dict):
        return Check(name, False, "the model's signed statement names no provenance")
    subject = verified.provenance.subject_digest
    if subject != statement.root_digest:
        return Check(
            name,
            False,
            f"the provenance is for other content (subject digest {subject[:16]}, "
            f"model root digest {statement.root_digest[:16]})",
        )
    if verified.payload_digest != named.get("statement_digest"):
        return Check(
            name,
            False,
            "not the provenance the model's signature names (statement digest "
            f"{verified.payload_digest[:16]}, signed {str(named.get('statement_digest'))[:16]})",
        )
    return Check(name, True, f"valid, by {key.name}; builder {verified.provenance.builder_id}")


def _approvals(
    doc: trust.TrustDocument,
    authority: str,
    statement: bundle.VerifiedStatement,
    add: Callable[[Check], None],
) -> None:
    needed = int((doc.authorities.get(authority) or {}).get("approval_count") or 0)
    records = statement.service_metadata.get("approvals") or []
    people = {r.get("approver") for r in records if isinstance(r, dict) and r.get("approver")}
    if len(people) >= needed:
        detail = f"{len(people)} distinct approvers (needs {needed})" if needed else "not required"
        add(Check("approvals", True, detail))
    else:
        add(
            Check(
                "approvals", False, f"{len(people)} distinct approvers; {authority} needs {needed}"
            )
        )
