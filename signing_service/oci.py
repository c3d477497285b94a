"""OCI image manifests as model manifests: sign a model image without pulling its layers.

Each layer becomes one resource: its name is the layer's ``org.opencontainers.image.title``
annotation, its digest the layer digest. When every layer is a raw model file (as
`oras push` and similar tools make them), the layer digest is the file's SHA-256, so the
same bundle also verifies against the model directory with `model_signing verify`.
No Django here: the `modelsign` client uses it too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from signing_service.manifest import ManifestError, Resource, validate_resources

TITLE = "org.opencontainers.image.title"
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def layer_resources(manifest: Mapping[str, Any], *, max_resources: int) -> list[Resource]:
    """The model files an image manifest describes, checked and in model_signing order."""
    if not isinstance(manifest, Mapping):
        raise ManifestError(
            "must be a JSON object (as `skopeo inspect --raw` prints it)", field="manifest"
        )
    media_type = manifest.get("mediaType")
    if media_type is not None and media_type not in MANIFEST_TYPES:
        raise ManifestError(
            f"mediaType {media_type!r} is not an image manifest (an index? pick one platform's manifest)",
            field="manifest.mediaType",
        )
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ManifestError("has no layers", field="manifest.layers")
    items = [_layer_item(i, layer) for i, layer in enumerate(layers)]
    try:
        return validate_resources(items, max_resources=max_resources)
    except ManifestError as exc:
        # Point at the layer, in the manifest's own terms.
        message = str(exc).replace("resources[", "manifest.layers[").replace("].name", "] title")
        raise ManifestError(message) from None


def _layer_item(i: int, layer: Any) -> dict[str, str]:
    where = f"manifest.layers[{i}]"
    if not isinstance(layer, Mapping):
        raise ManifestError("must be an object", field=where)
    annotations = layer.get("annotations") or {}
    title = annotations.get(TITLE) if isinstance(annotations, Mapping) else None
    if not isinstance(title, str) or not title:
        raise ManifestError(f"has no {TITLE} annotation naming the file it holds", field=where)
    digest = layer.get("digest")
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise ManifestError(
            f"digest {digest!r} is not a sha256:<64 hex> digest", field=f"{where}.digest"
        )
    return {"name": title, "algorithm": "sha256", "digest": match.group(1)}


def model_name(manifest: Mapping[str, Any]) -> str | None:
    """A name for the model from the manifest's own annotations, if it has one."""
    annotations = manifest.get("annotations") or {}
    if isinstance(annotations, Mapping):
        for key in (TITLE, "org.opencontainers.image.ref.name"):
            value = annotations.get(key)
            if isinstance(value, str) and value:
                return value
    return None
