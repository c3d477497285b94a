"""SLSA provenance v1 statements for tests, shaped like the ones real builders write."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from signing_service import bundle, slsa
from signing_service.manifest import Resource, root_digest, sort_resources

GITHUB_BUILDER = (
    "https://github.com/slsa-framework/slsa-github-generator/.github/workflows/"
    "generator_generic_slsa3.yml@refs/tags/v2.0.0"
)
BUILD_TYPE = "https://slsa-framework.github.io/github-actions-buildtypes/workflow/v1"
SOURCE = "git+https://github.com/acme/models@refs/heads/main"
COMMIT = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"


def root_of(resources: Sequence[dict[str, str]]) -> str:
    """The root digest the service computes for a request's resources."""
    return root_digest(sort_resources([Resource(**r) for r in resources]))


def statement(
    subject_digest: str,
    *,
    builder: str = GITHUB_BUILDER,
    name: str = "model",
    invocation: str = "https://github.com/acme/models/actions/runs/1/attempts/1",
) -> dict[str, Any]:
    return {
        "_type": bundle.STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": subject_digest}}],
        "predicateType": slsa.SLSA_PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "workflow": {
                        "ref": "refs/heads/main",
                        "repository": "https://github.com/acme/models",
                        "path": ".github/workflows/train.yml",
                    }
                },
                "internalParameters": {"github": {"event_name": "push"}},
                "resolvedDependencies": [{"uri": SOURCE, "digest": {"gitCommit": COMMIT}}],
            },
            "runDetails": {
                "builder": {"id": builder},
                "metadata": {"invocationId": invocation},
            },
        },
    }


def bundle_payload(data: bytes) -> bytes:
    """The DSSE payload of a bundle, as signed."""
    return base64.b64decode(bundle.parse_bundle(data)["dsseEnvelope"]["payload"])


def model_meta(data: bytes) -> dict[str, Any]:
    """Our metadata in a model bundle's statement."""
    return json.loads(bundle_payload(data))["predicate"][bundle.SERVICE_PREDICATE_KEY]
