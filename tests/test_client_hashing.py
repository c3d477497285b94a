"""`modelsign` hashing gives exactly what model_signing 1.1.1 computes, for any tree."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_signing import hashing as ms_hashing
from model_signing._signing import signing as ms_signing

from signing_service.client import cli
from signing_service.client import hashing as ours
from signing_service.manifest import DEFAULT_IGNORE_PATHS

Tree = Mapping[str, bytes]


def make_tree(root: Path, files: Tree) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def reference(
    path: Path, ignore: Iterable[str] = ()
) -> tuple[list[tuple[str, str]], str, set[str]]:
    """model_signing's resources, root digest and recorded ignore paths."""
    config = ms_hashing.Config().set_ignored_paths(paths=list(ignore))
    manifest = config.hash(path)
    resources = [(rd.identifier, rd.digest.digest_hex) for rd in manifest.resource_descriptors()]
    root = ms_signing.Payload(manifest).statement.pb.subject[0].digest["sha256"]
    return resources, root, set(manifest.serialization_type.get("ignore_paths", []))


def assert_same_as_reference(path: Path, ignore: Iterable[str] = (), **kwargs: object) -> None:
    ignore = list(ignore)
    expected, expected_root, expected_ignored = reference(path, ignore)
    result = ours.hash_model(path, ignore_paths=ignore, **kwargs)  # type: ignore[arg-type]
    assert [(r.name, r.digest) for r in result.resources] == expected
    assert result.root_digest == expected_root
    assert set(result.ignore_paths) == expected_ignored
    assert result.total_bytes == sum(
        (path / r.name).stat().st_size if r.name != "." else path.stat().st_size
        for r in result.resources
    )


# --- fixed trees -------------------------------------------------------------------------

TREES: dict[str, Tree] = {
    "nested": {
        "top.bin": b"top",
        "a/x": b"x" * 1000,
        "a/b/c/deep.txt": b"deep",
        "a/b/sibling": b"s",
        "z/last": b"last",
    },
    "names": {
        "with space.bin": b"1",
        "ünïcødé/файл.txt": "нет".encode(),
        "日本語.json": b"{}",
        ".hidden": b"h",
        "UPPER": b"u",
        "lower": b"l",
    },
    "empty_file": {"empty": b"", "not-empty": b"\0"},
    "ordering": {
        "sub/a": b"a",
        "sub-x": b"x",
        "sub.y": b"y",
        "sub0": b"0",
        "sub/b/c": b"c",
        "su": b"su",
    },
    "git": {
        ".git/HEAD": b"ref: refs/heads/main\n",
        ".git/objects/ab/cdef": b"blob",
        ".gitignore": b"*.tmp\n",
        ".gitattributes": b"*.bin filter=lfs\n",
        ".github/workflows/ci.yml": b"on: push\n",
        ".gitfoo": b"not ignored",
        "not.git": b"not ignored",
        "sub/.git": b"not ignored (only the top-level .git is)",
        "model.bin": b"weights",
    },
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_tree_matches_model_signing(tmp_path: Path, name: str) -> None:
    assert_same_as_reference(make_tree(tmp_path / name, TREES[name]))


def test_ordering_is_by_path_components(tmp_path: Path) -> None:
    result = ours.hash_model(make_tree(tmp_path / "m", TREES["ordering"]))
    assert [r.name for r in result.resources] == [
        "su",
        "sub/a",
        "sub/b/c",
        "sub-x",
        "sub.y",
        "sub0",
    ]


def test_single_file_model(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"single file model" * 100)
    assert_same_as_reference(model)
    result = ours.hash_model(model)
    assert [r.name for r in result.resources] == ["."]
    assert result.model == "model.safetensors"


def test_empty_directory(tmp_path: Path) -> None:
    assert_same_as_reference(make_tree(tmp_path / "empty", {}))


@pytest.mark.parametrize(
    "ignore",
    [
        ["data/cache"],  # a directory: all its children
        ["data/cache/", "README.md"],  # trailing slash, and a file
        ["./data"],
        ["logs", "missing-path"],
        ["data/cache/x.bin"],
    ],
)
def test_ignore_paths(tmp_path: Path, ignore: list[str]) -> None:
    model = make_tree(
        tmp_path / "m",
        {
            "data/cache/x.bin": b"x",
            "data/cache/deeper/y.bin": b"y",
            "data/keep.bin": b"k",
            "data/cache-not": b"n",
            "README.md": b"r",
            "logs/run.log": b"l",
            "weights.bin": b"w",
        },
    )
    assert_same_as_reference(model, ignore)


def test_recorded_ignore_paths_are_normalised_and_include_git_defaults(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m", {"a": b"a"})
    result = ours.hash_model(model, ignore_paths=["x//y/", "./z"])
    assert result.ignore_paths == sorted({*DEFAULT_IGNORE_PATHS, "x/y", "z"})


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", ".", "a/../..", ""])
def test_bad_ignore_paths_are_refused(tmp_path: Path, bad: str) -> None:
    model = make_tree(tmp_path / "m", {"a": b"a"})
    with pytest.raises(ours.HashError, match="ignore path"):
        ours.hash_model(model, ignore_paths=[bad])


def test_model_name_of_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tree(tmp_path / "my-model", {"a": b"a", "sub/b": b"b"})
    monkeypatch.chdir(model / "sub")
    assert ours.hash_model("..").model == ms_hashing.Config().hash("..").model_name == "my-model"
    monkeypatch.chdir(model)
    assert ours.hash_model(".").model == "my-model"


# --- large files, buffers, windows, workers -------------------------------------------


@pytest.mark.parametrize("use_mmap", [True, False])
@pytest.mark.parametrize("workers", [1, 3])
def test_multi_chunk_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_mmap: bool, workers: int
) -> None:
    # Small windows and buffers so that every boundary case is hit with little data.
    monkeypatch.setattr(ours, "MMAP_WINDOW", 64 * 1024)
    monkeypatch.setattr(ours, "MMAP_MIN_SIZE", 100_000)
    monkeypatch.setattr(ours, "READ_BUFFER", 4096)
    rnd = os.urandom(300_000)
    files = {
        "exact-window.bin": rnd[: 64 * 1024 * 2],
        "window-plus-one.bin": rnd[: 64 * 1024 * 3 + 1],
        "under-threshold.bin": rnd[:99_999],
        "odd.bin": rnd[:123_457],
        "small/1": b"1",
        "small/2": b"",
    }
    model = make_tree(tmp_path / "m", files)
    assert_same_as_reference(model, workers=workers, use_mmap=use_mmap)


def test_progress_reports_every_byte(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m", {"a": os.urandom(3 << 20), "b": b"bb", "c": b""})
    seen: list[int] = []
    result = ours.hash_model(model, progress=seen.append, workers=2)
    assert sum(seen) == result.total_bytes == (3 << 20) + 2


def test_file_growing_while_hashed_is_an_error(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m", {"grows.bin": b"\0" * (ours.READ_BUFFER + 10)})

    def append_once(_: int) -> None:
        if not getattr(append_once, "done", False):
            append_once.done = True  # type: ignore[attr-defined]
            with open(model / "grows.bin", "ab") as f:
                f.write(b"more")

    with pytest.raises(ours.HashError, match="changed while it was being hashed"):
        ours.hash_model(model, progress=append_once, workers=1, use_mmap=False)


# --- refusals --------------------------------------------------------------------------


def test_symlink_is_a_clear_error(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m", {"real.bin": b"r"})
    (model / "link.bin").symlink_to("real.bin")
    with pytest.raises(ours.HashError, match=r"'link.bin' is a symbolic link"):
        ours.hash_model(model)
    with pytest.raises(ValueError, match="symlink"):  # the reference refuses it too
        ms_hashing.Config().hash(model)


def test_symlink_inside_ignored_dir_is_refused_like_model_signing(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m", {"real.bin": b"r", ".git/HEAD": b"h"})
    (model / ".git" / "link").symlink_to("HEAD")
    with pytest.raises(ValueError, match="symlink"):
        ms_hashing.Config().hash(model)
    with pytest.raises(ours.HashError, match=r"\.git/link' is a symbolic link"):
        ours.hash_model(model)


def test_symlinked_directory_and_model_root(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m", {"d/f": b"f"})
    (model / "dlink").symlink_to("d", target_is_directory=True)
    with pytest.raises(ours.HashError, match="dlink"):
        ours.hash_model(model)
    (model / "dlink").unlink()
    (tmp_path / "root-link").symlink_to(model, target_is_directory=True)
    with pytest.raises(ours.HashError, match="symbolic link"):
        ours.hash_model(tmp_path / "root-link")


def test_special_file_is_an_error(tmp_path: Path) -> None:
    model = make_tree(tmp_path / "m", {"a": b"a"})
    os.mkfifo(model / "pipe")
    with pytest.raises(ours.HashError, match="'pipe' is a special file"):
        ours.hash_model(model)


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ours.HashError, match="cannot read model"):
        ours.hash_model(tmp_path / "nope")


# --- the `hash` command ----------------------------------------------------------------


def test_hash_command_prints_resource_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tree(tmp_path / "m", {**TREES["names"], "skip/me": b"s"})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["hash", "m", "--ignore-paths", "m/skip", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected, root, ignored = reference(model, ["skip"])
    assert out["model"] == "m"
    assert out["root_digest"] == root
    assert set(out["ignore_paths"]) == ignored
    assert [(r["name"], r["digest"]) for r in out["resources"]] == expected
    assert {r["algorithm"] for r in out["resources"]} == {"sha256"}


def test_hash_command_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tree(tmp_path / "m", {"a": b"a"})
    (model / "l").symlink_to("a")
    assert cli.main(["hash", str(model), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("modelsign: error: 'l' is a symbolic link")
    assert "Traceback" not in err


# --- random trees ----------------------------------------------------------------------

_segment = st.text(alphabet="ab-_. é0Zж", min_size=1, max_size=4).filter(
    lambda s: s not in (".", "..")
)
_entry = st.tuples(
    st.lists(
        st.one_of(_segment, st.sampled_from([".git", ".github", "sub", "sub-x"])),
        min_size=1,
        max_size=3,
    ),
    st.binary(max_size=40),
)


def _consistent(entries: list[tuple[list[str], bytes]]) -> dict[str, bytes]:
    """Drop entries whose path collides with another's file/directory role."""
    files: dict[tuple[str, ...], bytes] = {}
    dirs: set[tuple[str, ...]] = set()
    for parts, data in entries:
        key = tuple(parts)
        prefixes = {key[:i] for i in range(1, len(key))}
        if key in dirs or key in files or prefixes & files.keys():
            continue
        files[key] = data
        dirs |= prefixes
    return {"/".join(k): v for k, v in files.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(_entry, max_size=10), data=st.data())
def test_random_trees_match_model_signing(
    entries: list[tuple[list[str], bytes]], data: st.DataObject
) -> None:
    files = _consistent(entries)
    candidates = sorted({"/".join(n.split("/")[:i]) for n in files for i in (1, 2)})
    ignore = data.draw(st.lists(st.sampled_from(candidates), max_size=2)) if candidates else []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tree(Path(tmp) / "model", files)
        assert_same_as_reference(model, ignore, workers=data.draw(st.integers(1, 3)))
