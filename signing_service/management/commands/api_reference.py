"""``manage.py api_reference``: docs/api-reference.md, rendered from the OpenAPI schema.

The schema is the one served at ``/api/v1/schema/`` (drf-spectacular, from the views'
``extend_schema`` annotations and the serializers), so the reference cannot say anything the
API does not: ``tests/test_api_reference.py`` fails when the committed file differs from what
this command prints.
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from drf_spectacular.generators import SchemaGenerator

REGENERATE = "python manage.py api_reference --out docs/api-reference.md"
METHODS = ("get", "post", "put", "patch", "delete")


def current_schema() -> dict[str, Any]:
    """The OpenAPI document exactly as ``GET /api/v1/schema/`` serves it."""
    schema: dict[str, Any] = SchemaGenerator(api_version="1").get_schema(request=None, public=True)
    return schema


def render(schema: dict[str, Any]) -> str:
    """Markdown for the whole API: authentication, errors, each endpoint, each schema."""
    info = schema["info"]
    out = [
        "# API reference",
        "",
        f"<!-- Generated from the OpenAPI schema by `{REGENERATE}`. Do not edit by hand:",
        "     change the views' extend_schema annotations or the serializers, then regenerate. -->",
        "",
        f"{info['title']}: {info.get('description', '')} Schema version {info['version']}.",
        "",
        "The schema itself is served at `GET /api/v1/schema/` and browsable at `/api/v1/docs/`."
        " Request bodies are JSON (unknown fields are refused, see each body's fields);"
        ' every error is `{"error": {"code", "message", "details"}}` (schema `Error`).',
        "",
    ]
    out += _security(schema)
    out += _index(schema)
    for path, operations in schema["paths"].items():
        for method in METHODS:
            if method in operations:
                out += _operation(path, method, operations[method], schema["components"])
    out += _schemas(schema["components"].get("schemas", {}))
    return "\n".join(_tidy(out)).rstrip() + "\n"


def _tidy(lines: list[str]) -> list[str]:
    """No runs of blank lines."""
    result: list[str] = []
    for line in lines:
        if line == "" and result and result[-1] == "":
            continue
        result.append(line.rstrip())
    return result


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _security(schema: dict[str, Any]) -> list[str]:
    schemes = schema["components"].get("securitySchemes", {})
    out = ["## Authentication", "", "| scheme | kind | description |", "|---|---|---|"]
    for name, scheme in schemes.items():
        if scheme["type"] == "http":
            kind = f"`Authorization: {scheme['scheme'].title()} ...`"
            if scheme.get("bearerFormat"):
                kind += f" ({scheme['bearerFormat']})"
        else:
            kind = f"{scheme['in']} `{scheme['name']}`"
        out.append(f"| `{name}` | {kind} | {_cell(scheme.get('description', ''))} |")
    out += [
        "",
        "An endpoint lists the schemes it accepts, any one of them; `none` means no"
        " credential is needed.",
        "",
    ]
    return out


def _index(schema: dict[str, Any]) -> list[str]:
    out = ["## Endpoints", "", "| method | path | summary | authentication |", "|---|---|---|---|"]
    for path, operations in schema["paths"].items():
        for method in METHODS:
            if method in operations:
                op = operations[method]
                anchor = _anchor(f"{method.upper()} {path}")
                out.append(
                    f"| {method.upper()} | [`{path}`](#{anchor}) | {_cell(op.get('summary', ''))}"
                    f" | {_auth(op)} |"
                )
    return [*out, ""]


def _anchor(title: str) -> str:
    """GitHub's heading anchor for ``### `METHOD /path` ``."""
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


def _auth(op: dict[str, Any]) -> str:
    names = [name for requirement in op.get("security", [{}]) for name in requirement]
    return ", ".join(f"`{n}`" for n in names) or "none"


def _operation(path: str, method: str, op: dict[str, Any], components: dict[str, Any]) -> list[str]:
    out = [f"### `{method.upper()} {path}`", ""]
    if op.get("summary"):
        out += [f"**{op['summary']}.**" if not op["summary"].endswith(".") else op["summary"], ""]
    if op.get("description"):
        out += [op["description"], ""]
    out += [f"Authentication: {_auth(op)}.", ""]
    if op.get("parameters"):
        out += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in op["parameters"]:
            out.append(
                f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))}"
                f" | {'yes' if p.get('required') else 'no'} | {_cell(p.get('description', ''))} |"
            )
        out.append("")
    body = op.get("requestBody")
    if body:
        for media, content in body["content"].items():
            required = "required" if body.get("required") else "optional"
            out += [f"Request body ({required}, `{media}`): {_type(content['schema'])}.", ""]
            ref = content["schema"].get("$ref", "")
            if ref.startswith("#/components/schemas/"):
                out += _fields(components["schemas"][ref.rsplit("/", 1)[-1]])
    out += ["| status | body | description |", "|---|---|---|"]
    for status, response in op["responses"].items():
        contents = response.get("content", {})
        bodies = "; ".join(
            f"`{media}`" + (f" {_type(c['schema'])}" if c.get("schema") else "")
            for media, c in contents.items()
        )
        text = response.get("description") or HTTPStatus(int(status)).phrase
        out.append(f"| {status} | {bodies or 'none'} | {_cell(text)} |")
    return [*out, ""]


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _type(schema["allOf"][0])
    if "oneOf" in schema:
        return " or ".join(_type(s) for s in schema["oneOf"])
    kind = schema.get("type")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"] if v is not None)
    if kind == "object" and "properties" in schema:
        return "object {" + ", ".join(schema["properties"]) + "}"
    if kind is None:
        return "any JSON"
    text = f"{kind} ({schema['format']})" if "format" in schema else str(kind)
    return text


def _constraints(schema: dict[str, Any]) -> str:
    words = []
    for key, label in (
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minimum", "min"),
        ("maximum", "max"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("pattern", "pattern"),
        ("default", "default"),
    ):
        if key in schema:
            words.append(f"{label} `{schema[key]}`")
    if schema.get("nullable"):
        words.append("nullable")
    if schema.get("readOnly"):
        words.append("read-only")
    if schema.get("writeOnly"):
        words.append("write-only")
    return ", ".join(words)


def _schemas(schemas: dict[str, Any]) -> list[str]:
    out = ["## Schemas", ""]
    for name, schema in schemas.items():
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [schema["description"], ""]
        if "enum" in schema:
            out += ["One of " + ", ".join(f"`{v}`" for v in schema["enum"]) + ".", ""]
            continue
        out += _fields(schema)
    return out


def _fields(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    out = ["| field | type | required | description |", "|---|---|---|---|"]
    for field, prop in schema.get("properties", {}).items():
        notes = "; ".join(
            part for part in (_cell(prop.get("description", "")), _constraints(prop)) if part
        )
        out.append(
            f"| `{field}` | {_type(prop)} | {'yes' if field in required else 'no'} | {notes} |"
        )
    return [*out, ""]


class Command(BaseCommand):
    help = "Write the API reference (markdown) from the OpenAPI schema; see docs/api-reference.md."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--out", type=Path, help="write it here (default: standard output)")
        parser.add_argument(
            "--check",
            action="store_true",
            help="with --out: change nothing, fail if the file differs from the schema",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        text = render(current_schema())
        out: Path | None = opts["out"]
        if opts["check"]:
            if out is None:
                raise CommandError("--check needs --out FILE")
            if not out.exists() or out.read_text() != text:
                raise CommandError(f"{out} is out of date with the API schema; run: {REGENERATE}")
            return
        if out is None:
            self.stdout.write(text, ending="")
        else:
            out.write_text(text)
