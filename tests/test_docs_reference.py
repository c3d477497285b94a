"""docs/operator-guide.md documents exactly what the code reads.

The names come from the code itself, never from a copied list: every environment variable a
module reads (the typed helpers of ``signing_service/env.py`` and ``os.environ`` / ``os.getenv``,
found by parsing the source), every field the policy loader accepts (its ``_mapping`` calls in
``signing_service/policy.py``) and every field of the OIDC configuration file (the same in
``signing_service/oidc_config.py``). A name the code reads that the guide lacks fails, and so
does a name the guide documents that the code no longer reads.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "operator-guide.md"
#: Where the service, its worker, its client and its launcher read the environment.
SOURCES = ["signing_service", "keys", "worker", "approvals", "provenance", "deploy"]
#: signing_service/env.py: the helpers themselves read names they are given.
HELPERS = {"env_str", "env_bool", "env_int", "env_list", "env_path", "env_secret"}
SECRET_HELPER = "env_secret"


# --- what the code reads ------------------------------------------------------------------


def _python_files() -> Iterator[Path]:
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "migrations" in path.parts or path == ROOT / "signing_service" / "env.py":
                continue
            yield path


def _name(node: ast.expr) -> str | None:
    """A literal name, or an f-string's with each ``{expr}`` as ``<VARIABLE>``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                out.append(str(part.value))
            else:
                called = {id(c.func) for c in ast.walk(part) if isinstance(c, ast.Call)}
                names = [
                    n.id for n in ast.walk(part) if isinstance(n, ast.Name) and id(n) not in called
                ]
                out.append(f"<{(names[-1] if names else 'x').upper()}>")
        return "".join(out)
    return None


def _is_os_environ(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _reads(tree: ast.AST) -> Iterator[tuple[str, bool]]:
    """(name, is_secret) for every environment read in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            first = _name(node.args[0])
            if first is None:
                continue
            if isinstance(func, ast.Name) and func.id in HELPERS:
                yield first, func.id == SECRET_HELPER
            elif isinstance(func, ast.Attribute) and (
                (func.attr in ("get", "setdefault") and _is_os_environ(func.value))
                or (
                    func.attr == "getenv"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "os"
                )
            ):
                yield first, False
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and _is_os_environ(node.value)
        ):
            if (name := _name(node.slice)) is not None:
                yield name, False
        elif isinstance(node, ast.Compare) and any(
            isinstance(o, ast.In | ast.NotIn) for o in node.ops
        ):
            if any(_is_os_environ(c) for c in node.comparators):
                if (name := _name(node.left)) is not None:
                    yield name, False


def _placeholders(name: str) -> str:
    """``PKCS11_TOKEN_<SUFFIX>`` and ``PKCS11_TOKEN_<AUTHORITY>`` are one name."""
    return re.sub(r"<[^>]*>", "<*>", name)


@functools.cache
def settings_read_by_code() -> dict[str, bool]:
    """Every environment variable name the code reads -> whether it is a secret (NAME_FILE)."""
    found: dict[str, bool] = {}
    for path in _python_files():
        for name, secret in _reads(ast.parse(path.read_text(), filename=str(path))):
            name = _placeholders(name)
            found[name] = found.get(name, False) or secret
    return found


# --- what the guide documents ---------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text under a markdown heading (any level), up to the next heading of that level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    assert match, f"docs/operator-guide.md has no heading {heading!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def _documented_names(section: str) -> dict[str, str]:
    """Backticked names in the first cell of each table row -> the whole row."""
    rows = {}
    for line in section.splitlines():
        if not line.startswith("|") or re.match(r"^\|\s*-", line):
            continue
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            rows[_placeholders(name)] = line
    return rows


def guide() -> str:
    return GUIDE.read_text()


# --- environment settings -----------------------------------------------------------------

ENV_SECTION = "Environment reference"


def test_the_scan_finds_what_the_settings_module_and_the_backends_read() -> None:
    """The scanner itself: these reads exist in the code in each of its forms."""
    found = settings_read_by_code()
    assert found["SECRET_KEY"] is True  # env_secret
    assert found["MODELSIGN_ENV"] is False  # env_str
    assert "PKCS11_TOKEN_<*>" in found  # os.environ.get(f"...{_env_suffix(authority)}")
    assert "VAULT_TOKEN_FILE" in found  # os.environ.get in keys/registry.py
    assert "SOFTHSM2_CONF" in found  # `not in os.environ` in settings.py
    assert "WEB_CONCURRENCY" in found  # deploy/gunicorn.conf.py
    assert len(found) > 60


def test_every_setting_the_code_reads_is_in_the_guide() -> None:
    documented = _documented_names(_section(guide(), ENV_SECTION))
    missing = sorted(set(settings_read_by_code()) - set(documented))
    assert not missing, (
        f"docs/operator-guide.md ({ENV_SECTION}) does not document {', '.join(missing)}: "
        "add a table row for each (name, type, default, what it does)"
    )


def test_the_guide_documents_no_setting_the_code_no_longer_reads() -> None:
    read = settings_read_by_code()
    allowed = set(read) | {f"{name}_FILE" for name, secret in read.items() if secret}
    stale = sorted(set(_documented_names(_section(guide(), ENV_SECTION))) - allowed)
    assert not stale, (
        f"docs/operator-guide.md ({ENV_SECTION}) documents {', '.join(stale)}, "
        "which no module reads any more: remove the rows or fix the names"
    )


def test_every_secret_is_documented_with_its_file_form() -> None:
    rows = _documented_names(_section(guide(), ENV_SECTION))
    lacking = sorted(
        name
        for name, secret in settings_read_by_code().items()
        if secret and f"`{name}_FILE`" not in rows.get(name, "")
    )
    assert not lacking, (
        f"these secrets are read with env_secret but their row does not name NAME_FILE: {lacking}"
    )


# --- policy and OIDC configuration fields -------------------------------------------------


def _set_literal(node: ast.expr, scope: dict[str, ast.expr]) -> set[str] | None:
    if isinstance(node, ast.Name) and node.id in scope:
        node = scope[node.id]
    if isinstance(node, ast.Set):
        return {e.value for e in node.elts if isinstance(e, ast.Constant)}
    return None


def loader_fields(module: Path) -> dict[str, set[str]]:
    """Function name -> the field names its ``_mapping(..., required=, optional=)`` calls accept.

    Names of sets assigned at module level or in the function (``optional=fields``) are
    resolved, so the result is the loader's own field definitions.
    """
    tree = ast.parse(module.read_text())
    top: dict[str, ast.expr] = {
        t.id: n.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    out: dict[str, set[str]] = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or fn.name == "_mapping":
            continue
        scope = dict(top)
        for n in ast.walk(fn):
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
                scope[n.targets[0].id] = n.value
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "_mapping":
                for kw in call.keywords:
                    if kw.arg in ("required", "optional") and (
                        fields := _set_literal(kw.value, scope)
                    ):
                        out.setdefault(fn.name, set()).update(fields)
    return out


#: Loader function -> the guide's heading for the fields it accepts. A new loader section
#: (a new function calling _mapping) fails the test below until the guide has a table for it.
POLICY_SECTIONS = {
    "parse_policy": "Policy: top level",
    "_authority": "Policy: signing authorities (key-based)",
    "_key_based": "Policy: signing authorities (key-based)",
    "_keyless": "Policy: signing authorities (keyless)",
    "_verification": "Policy: verification_policy",
    "_key_management": "Policy: key_management",
}
OIDC_SECTIONS = {
    "parse_oidc_config": "OIDC configuration: top level",
    "_issuer": "OIDC configuration: issuers",
}


def _check_fields(module: Path, sections: dict[str, str]) -> None:
    fields = loader_fields(module)
    unmapped = sorted(set(fields) - set(sections))
    assert not unmapped, (
        f"{module.name}: {unmapped} accept fields the guide has no section for: add a table to "
        "docs/operator-guide.md and the function to this test's section map"
    )
    expected: dict[str, set[str]] = {}
    for function, names in fields.items():
        expected.setdefault(sections[function], set()).update(names)
    text = guide()
    for heading, names in expected.items():
        documented = set(_documented_names(_section(text, heading)))
        missing, stale = sorted(names - documented), sorted(documented - names)
        assert not missing, f"docs/operator-guide.md, {heading!r}: no row for {missing}"
        assert not stale, (
            f"docs/operator-guide.md, {heading!r}: {stale} documented but the loader "
            f"({module.name}) does not accept them"
        )


def test_the_field_scan_finds_the_loaders_fields() -> None:
    policy = loader_fields(ROOT / "signing_service" / "policy.py")
    assert {"key_storage", "provenance_builders", "approval_count"} <= policy["_key_based"]
    assert "ceremony_quorum" in policy["_key_management"]
    oidc = loader_fields(ROOT / "signing_service" / "oidc_config.py")
    assert {"issuer", "audience", "repository_owner_ids"} <= oidc["_issuer"]
    assert "require_oidc" in oidc["parse_oidc_config"]


def test_every_policy_field_is_in_the_guide_and_nothing_else() -> None:
    _check_fields(ROOT / "signing_service" / "policy.py", POLICY_SECTIONS)


def test_every_oidc_config_field_is_in_the_guide_and_nothing_else() -> None:
    _check_fields(ROOT / "signing_service" / "oidc_config.py", OIDC_SECTIONS)


def test_reference_rows_have_four_cells() -> None:
    """Name, type, default, meaning: a row that lost a cell renders as a broken table."""
    section = _section(guide(), ENV_SECTION)
    bad = [
        line
        for line in section.splitlines()
        if line.startswith("| `") and len(line.strip().strip("|").split(" | ")) < 4
    ]
    assert not bad, f"rows without name | type | default | meaning: {bad[:3]}"
