"""`modelsign hash --cache`: reuse digests of files that have not changed since last time.

A file's digest is reused only when its size, mtime (ns), inode and device all match the
entry recorded when it was hashed. A file modified within RACY_SECONDS of being recorded is
not recorded at all: a later write in the same timestamp tick would otherwise keep the same
size and mtime with new content ("racily clean", the problem git solves the same way).
The cache lives outside the model (so it never becomes a model file) and is only a speed-up:
`modelsign verify` never uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from signing_service.client.hashing import HashResult, ModelScan, ProgressCallback, hash_files
from signing_service.manifest import Resource

RACY_SECONDS = 2.0
VERSION = 1


@dataclass(frozen=True)
class CachedHash:
    result: HashResult
    reused: int
    hashed: int


def default_cache_file(model: str | os.PathLike[str]) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelsign"
    key = hashlib.sha256(os.fsencode(os.path.realpath(model))).hexdigest()[:24]
    return base / f"hashes-{key}.json"


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _load(cache_file: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a full hash
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _save(cache_file: Path, entries: dict[str, dict[str, object]]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": VERSION, "entries": entries}))
    os.replace(tmp, cache_file)  # readers see the old or the new cache, never half of one


def hash_with_cache(
    scan: ModelScan,
    cache_file: Path,
    *,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> CachedHash:
    old = _load(cache_file)
    stamps = {f.path: _stamp(f.path) for f in scan.files}  # before hashing: a later change shows
    reused: dict[str, str] = {}
    for f in scan.files:
        entry = old.get(f.path)
        if (
            isinstance(entry, dict)
            and entry.get("stamp") == stamps[f.path]
            and isinstance(entry.get("digest"), str)
        ):
            reused[f.name] = str(entry["digest"])
    fresh = ModelScan(
        model=scan.model,
        files=[f for f in scan.files if f.name not in reused],
        ignore_paths=scan.ignore_paths,
    )
    hashed = {
        r.name: r.digest for r in hash_files(fresh, workers=workers, progress=progress).resources
    }
    digests = reused | hashed
    resources = [Resource(name=f.name, digest=digests[f.name]) for f in scan.files]
    now_ns = time.time_ns() - int(RACY_SECONDS * 1e9)
    entries = {
        f.path: {"stamp": stamps[f.path], "digest": digests[f.name]}
        for f in scan.files
        if stamps[f.path][1] < now_ns
    }
    _save(cache_file, entries)
    result = HashResult(
        model=scan.model,
        resources=resources,
        ignore_paths=list(scan.ignore_paths),
        total_bytes=scan.total_bytes,
    )
    return CachedHash(result, reused=len(reused), hashed=len(hashed))
