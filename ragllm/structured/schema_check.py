"""JSON Schemas from requests, checked as schemas before anything compiles, hashes or forwards them.

A schema is refused (400, naming its field) when it is too deep or too large, when a keyword has a
value of the wrong kind (``"format": ["email"]``, ``"required": "a"``: checked against the JSON
Schema meta-schema by jsonschema-rs, a Rust validator that checks a 5,000-property schema in about
1 ms where the pure-Python ``jsonschema`` takes about a second), when it names a dialect (``$schema``)
that is not a published JSON Schema draft (a validator would fetch any other URI), or when a
``$ref`` leads back to where it started without a value in between (``{"$ref": "#"}``), which no
answer can ever satisfy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ragllm.bounded_json import JsonLimits, check_structure
from ragllm.errors import InvalidRequest

# Where a JSON Schema holds other schemas: by name, in a list, or as one.
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = (
    "items",
    "additionalProperties",
    "not",
    "contains",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
)
# Subschemas a value must satisfy as well as the schema holding them (a $ref's target too); anyOf and
# oneOf branches are alternatives (a cycle through one may have a way out), not requirements.
_REQUIRED_LISTS = ("allOf",)
# The published drafts' meta-schemas, as clients write them (with or without the trailing '#').
DIALECTS = frozenset(
    f"{scheme}://json-schema.org/{path}"
    for scheme in ("http", "https")
    for path in (
        "draft-04/schema",
        "draft-06/schema",
        "draft-07/schema",
        "draft/2019-09/schema",
        "draft/2020-12/schema",
    )
)


def check_schema(schema: Any, param: str, limits: JsonLimits) -> None:
    """Raises InvalidRequest (400, ``param``) unless ``schema`` is a JSON Schema object within ``limits``."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object", param=param)
    check_structure(schema, limits, param)
    dialect = schema.get("$schema")
    if dialect is not None and (
        not isinstance(dialect, str) or dialect.rstrip("#") not in DIALECTS
    ):
        raise InvalidRequest(
            f"{param}.$schema must name a published JSON Schema draft (draft-04 to 2020-12)",
            param=param,
        )
    _check_keywords(schema, param)
    _refuse_empty_cycles(schema, param)


def num_properties(schema: dict[str, Any]) -> int:
    """Property names ``schema`` declares, in all its subschemas together."""
    return sum(
        len(sub["properties"])
        for sub in _subschemas(schema)
        if isinstance(sub.get("properties"), dict)
    )


def _check_keywords(schema: dict[str, Any], param: str) -> None:
    import jsonschema_rs

    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        where = "".join(f"/{part}" for part in exc.instance_path) or "/"
        raise InvalidRequest(
            f"{param} is not a valid JSON Schema: at {where}, {exc.message.splitlines()[0]}",
            param=param,
        ) from None
    except jsonschema_rs.ReferencingError as exc:
        raise InvalidRequest(
            f"{param} is not a valid JSON Schema: {str(exc).splitlines()[0]}", param=param
        ) from None


def _refuse_empty_cycles(root: dict[str, Any], param: str) -> None:
    """Depth-first over "the same value must also satisfy" edges (a $ref, allOf), with an explicit stack:
    a cycle among them is a schema that requires itself forever."""
    state: dict[int, bool] = {}  # id of a subschema → True while on the path, False once explored
    for start in _subschemas(root):
        if id(start) in state:
            continue
        state[id(start)] = True
        path: list[tuple[dict[str, Any], Iterator[dict[str, Any]]]] = [
            (start, _same_value(root, start))
        ]
        while path:
            node, successors = path[-1]
            following = next(successors, None)
            if following is None:
                state[id(node)] = False
                path.pop()
            elif state.get(id(following)) is True:
                raise InvalidRequest(
                    f"{param} refers back to itself through $ref without any value in between, "
                    "so no answer can satisfy it",
                    param=param,
                )
            elif id(following) not in state:
                state[id(following)] = True
                path.append((following, _same_value(root, following)))


def _subschemas(root: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every schema object in ``root``, ``root`` included."""
    pending = [root]
    while pending:
        schema = pending.pop()
        yield schema
        for key in SCHEMA_MAPS:
            value = schema.get(key)
            if isinstance(value, dict):
                pending += [sub for sub in value.values() if isinstance(sub, dict)]
        for key in SCHEMA_LISTS:
            value = schema.get(key)
            if isinstance(value, list):
                pending += [sub for sub in value if isinstance(sub, dict)]
        pending += [schema[key] for key in SCHEMA_VALUES if isinstance(schema.get(key), dict)]


def _same_value(root: dict[str, Any], schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    reference = schema.get("$ref")
    if isinstance(reference, str):
        target = _resolved(root, reference)
        if target is not None:
            yield target
    for key in _REQUIRED_LISTS:
        value = schema.get(key)
        if isinstance(value, list):
            yield from (sub for sub in value if isinstance(sub, dict))


def _resolved(root: dict[str, Any], reference: str) -> dict[str, Any] | None:
    """The object a local JSON Pointer reference ("#", "#/$defs/a") names, or None (another document,
    an anchor, or nothing there: the grammar compiler reports those)."""
    if reference != "#" and not reference.startswith("#/"):
        return None
    node: Any = root
    for token in reference[2:].split("/") if reference != "#" else ():
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(token)
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node if isinstance(node, dict) else None
