"""Model manifests: the list of (file name, SHA-256 digest) resources that is signed.

This module is shared by the service and the `modelsign` client, so it imports nothing
from Django. It guarantees:

* resource names are safe, relative POSIX paths (see :func:`check_resource_name`);
* resources are ordered exactly as the OpenSSF `model_signing` tool orders them
  (by path components, so ``sub/a`` sorts before ``sub-x``);
* the root digest is SHA-256 over the concatenated raw 32-byte resource digests in
  that order, which is what `model_signing` recomputes when it verifies.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = [
    "ALGORITHM",
    "DEFAULT_IGNORE_PATHS",
    "ManifestError",
    "Resource",
    "check_ignore_path",
    "check_resource_name",
    "root_digest",
    "sort_resources",
    "validate_resources",
]

ALGORITHM = "sha256"
#: Paths that `model_signing` ignores by default (its ``ignore_git_paths``).
DEFAULT_IGNORE_PATHS: tuple[str, ...] = (".git", ".gitattributes", ".github", ".gitignore")

_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_NAME_BYTES = 4096
MAX_SEGMENT_BYTES = 255
# Bidirectional overrides and isolates make a name display differently from what it is.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


class ManifestError(ValueError):
    """A resource list or name is not acceptable. The message names the problem."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
        self.reason = message


@dataclass(frozen=True, slots=True)
class Resource:
    """One hashed file of a model: a relative POSIX path and its lowercase hex digest."""

    name: str
    digest: str
    algorithm: str = ALGORITHM

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "algorithm": self.algorithm, "digest": self.digest}

    @property
    def sort_key(self) -> tuple[str, ...]:
        return PurePosixPath(self.name).parts


def _bad_character(name: str) -> str | None:
    for ch in name:
        if ch == "\x00":
            return "contains a NUL character"
        if ch in _BIDI:
            return f"contains a bidirectional control character U+{ord(ch):04X}"
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            return f"contains a control character U+{ord(ch):04X}"
    return None


def check_resource_name(name: object, *, single_file_ok: bool = True) -> str:
    """Return ``name`` if it is a safe relative POSIX path, else raise :class:`ManifestError`.

    ``"."`` is the name `model_signing` gives the one resource of a single-file model.
    """
    if not isinstance(name, str):
        raise ManifestError("must be a string")
    if name == "." and single_file_ok:
        return name
    if not name:
        raise ManifestError("must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ManifestError(f"is longer than {MAX_NAME_BYTES} bytes")
    problem = _bad_character(name)
    if problem:
        raise ManifestError(problem)
    if "\\" in name:
        raise ManifestError("contains a backslash; use '/' as the separator")
    if name.startswith("/"):
        raise ManifestError("is an absolute path; names are relative to the model root")
    for segment in name.split("/"):
        if segment in ("", "."):
            raise ManifestError("has an empty or '.' path segment")
        if segment == "..":
            raise ManifestError("has a '..' path segment")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise ManifestError(f"has a path segment longer than {MAX_SEGMENT_BYTES} bytes")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ManifestError("is not valid Unicode (lone surrogate)") from exc
    return name


def check_ignore_path(path: object) -> str:
    """Validate one entry of ``ignore_paths`` (same rules as resource names, no ``.``)."""
    return check_resource_name(path, single_file_ok=False)


def _check_digest(digest: object) -> str:
    if not isinstance(digest, str):
        raise ManifestError("must be a string of 64 lowercase hex characters")
    if not _HEX64.fullmatch(digest):
        raise ManifestError(
            f"must be 64 lowercase hex characters (a SHA-256 digest), got {len(digest)} "
            "characters" + ("" if len(digest) != 64 else " that are not all lowercase hex")
        )
    return digest


def validate_resources(items: Sequence[object], *, max_resources: int) -> list[Resource]:
    """Turn untrusted JSON resource entries into sorted :class:`Resource` objects.

    Raises :class:`ManifestError` naming the first offending entry (``resources[i].field``).
    Rejects names that collide after Unicode NFC normalisation: two such names look the same
    to a person and on many file systems, so one of them could stand in for the other.
    """
    if not isinstance(items, list | tuple):
        raise ManifestError("must be a list", field="resources")
    if not items:
        raise ManifestError("must list at least one file", field="resources")
    if len(items) > max_resources:
        raise ManifestError(
            f"has {len(items)} entries; at most {max_resources} are accepted", field="resources"
        )
    seen: dict[str, int] = {}
    out: list[Resource] = []
    for i, item in enumerate(items):
        where = f"resources[{i}]"
        if not isinstance(item, dict):
            raise ManifestError("must be an object with name, algorithm and digest", field=where)
        unknown = set(item) - {"name", "algorithm", "digest", "size"}
        if unknown:
            raise ManifestError(f"unknown field(s): {', '.join(sorted(unknown))}", field=where)
        algorithm = item.get("algorithm", ALGORITHM)
        if algorithm != ALGORITHM:
            raise ManifestError(
                f"unsupported algorithm {algorithm!r}; only 'sha256' is accepted",
                field=f"{where}.algorithm",
            )
        try:
            name = check_resource_name(item.get("name"))
        except ManifestError as exc:
            raise ManifestError(exc.reason, field=f"{where}.name") from None
        try:
            digest = _check_digest(item.get("digest"))
        except ManifestError as exc:
            raise ManifestError(exc.reason, field=f"{where}.digest") from None
        normal = unicodedata.normalize("NFC", name)
        if normal in seen:
            raise ManifestError(
                f"{name!r} is the same file name as resources[{seen[normal]}] after Unicode "
                "normalisation",
                field=f"{where}.name",
            )
        seen[normal] = i
        out.append(Resource(name=name, digest=digest))
    if len(out) > 1 and any(r.name == "." for r in out):
        raise ManifestError(
            "'.' (a single-file model) must be the only resource", field="resources"
        )
    _check_no_file_is_a_directory(out)
    return sort_resources(out)


def _check_no_file_is_a_directory(resources: Iterable[Resource]) -> None:
    names = {r.name for r in resources}
    for name in names:
        parent = name.rpartition("/")[0]
        while parent:
            if parent in names:
                raise ManifestError(
                    f"{parent!r} is listed as a file but is also the directory of {name!r}",
                    field="resources",
                )
            parent = parent.rpartition("/")[0]


def sort_resources(resources: Iterable[Resource]) -> list[Resource]:
    """Order resources as `model_signing` does: by path components."""
    return sorted(resources, key=lambda r: r.sort_key)


def root_digest(resources: Iterable[Resource]) -> str:
    """SHA-256 over the concatenated raw resource digests, in the given order (hex)."""
    h = hashlib.sha256()
    for r in resources:
        h.update(bytes.fromhex(r.digest))
    return h.hexdigest()
