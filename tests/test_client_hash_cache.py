"""`modelsign hash --cache`: unchanged files are not re-read; results equal model_signing's."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from signing_service.client import hashcache
from signing_service.client.cli import main
from signing_service.client.hashing import scan_model
from tests.fixtures_service import reference_resources, write_model


def old(path: Path) -> None:
    """Make a file look written long ago, so the cache may record it."""
    past = time.time() - 3600
    os.utime(path, (past, past))


def run(model: Path, cache: Path, capsys: Any) -> tuple[list[dict[str, str]], str]:
    capsys.readouterr()
    assert main(["hash", str(model), "--cache-file", str(cache)]) == 0
    out = capsys.readouterr()
    return json.loads(out.out)["resources"], out.err


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = write_model(
        tmp_path / "m", {"a.bin": b"a" * 1000, "sub/b.bin": b"b" * 1000, "c.json": b"{}"}
    )
    for path in root.rglob("*"):
        if path.is_file():
            old(path)
    return root


def test_second_run_reuses_every_digest(model: Path, tmp_path: Path, capsys: Any) -> None:
    cache = tmp_path / "cache.json"
    first, err = run(model, cache, capsys)
    assert "reused 0 of 3" in err
    second, err = run(model, cache, capsys)
    assert "reused 3 of 3" in err
    assert first == second == reference_resources(model)


def test_a_changed_file_is_rehashed(model: Path, tmp_path: Path, capsys: Any) -> None:
    cache = tmp_path / "cache.json"
    run(model, cache, capsys)
    (model / "a.bin").write_bytes(b"z" * 1000)  # same size, new mtime
    old(model / "a.bin")  # even an mtime set back in time differs from the recorded one
    resources, err = run(model, cache, capsys)
    assert "reused 2 of 3" in err
    assert resources == reference_resources(model)


def test_recently_written_files_are_not_trusted_from_the_cache(
    model: Path, tmp_path: Path, capsys: Any
) -> None:
    cache = tmp_path / "cache.json"
    (model / "c.json").write_bytes(b'{"x": 1}')  # just written: racily clean, not recorded
    run(model, cache, capsys)
    entries = json.loads(cache.read_text())["entries"]
    assert str(model / "c.json") not in entries and len(entries) == 2


def test_a_damaged_cache_costs_only_a_full_hash(model: Path, tmp_path: Path, capsys: Any) -> None:
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    resources, err = run(model, cache, capsys)
    assert "reused 0 of 3" in err and resources == reference_resources(model)


def test_a_forged_cache_entry_for_another_stamp_is_ignored(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    scan = scan_model(model)
    target = next(f for f in scan.files if f.name == "a.bin")
    cache.write_text(
        json.dumps(
            {"version": 1, "entries": {target.path: {"stamp": [0, 0, 0, 0], "digest": "0" * 64}}}
        )
    )
    result = hashcache.hash_with_cache(scan, cache)
    assert result.reused == 0
    assert [r.to_json() for r in result.result.resources] == reference_resources(model)
