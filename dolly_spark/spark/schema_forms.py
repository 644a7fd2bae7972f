"""Schemas as users write them elsewhere, read into a Spark ``StructType``: a JSON Schema (a dict or
its text: the form vLLM's structured outputs, Databricks ``ai_query``'s ``responseFormat`` and
OpenAI's structured outputs take) or a pydantic model class.

The struct is the one form the rest of the package works from (the constraint's JSON Schema,
the ``parsed`` column, the fingerprint), so a schema is read once, here, and anything it says
that a struct cannot hold is refused, naming the field, rather than dropped:

- ``string``, ``boolean``, ``integer`` (BIGINT), ``number`` (DOUBLE), ``string`` with format
  ``date`` or ``date-time`` (DATE, TIMESTAMP), ``array`` with ``items``, ``object`` with
  ``properties`` (a struct), ``object`` with only ``additionalProperties`` (a map from strings);
- ``enum`` (or ``const``) of strings: a STRING field that may hold only those values; the values
  are kept in the field's metadata (``ENUM_KEY``), from which the constraint is made;
- ``"null"`` in ``type``, ``anyOf``/``oneOf`` of one type and null (pydantic's ``Optional``), or a
  property missing from ``required``: a nullable field (always present in the answer, null when
  the model has nothing to put there);
- ``description`` is the field's COMMENT; ``$ref`` to ``$defs``/``definitions`` (pydantic's
  nested models and enums) is followed; ``title``, ``default`` and ``examples`` say nothing about
  the column and are ignored.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DataType,
    DateType,
    DoubleType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from dolly_spark.request import json_schema_object

# A field's metadata key for the values its strings may take (the field's own, or its array
# elements' or map values' when it holds strings).
ENUM_KEY = "enum"

_SCALARS: dict[str, DataType] = {"string": StringType(), "boolean": BooleanType(), "integer": LongType(),
                                 "number": DoubleType()}
_FORMATS: dict[str, DataType] = {"date": DateType(), "date-time": TimestampType()}
_IGNORED = {"title", "default", "examples", "$schema", "$id", "$comment", "$defs", "definitions", "description"}
_MAPPED = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "format", "anyOf",
           "oneOf", "allOf", "$ref"}


def is_pydantic_model(schema: Any) -> bool:
    """Whether ``schema`` is a pydantic (v2) model class, checked without importing pydantic."""
    return isinstance(schema, type) and callable(getattr(schema, "model_json_schema", None))


def json_schema_of(schema: str | Mapping[str, Any] | type) -> dict[str, Any]:
    """The JSON Schema ``schema`` stands for: JSON text parsed, a dict as it is, a pydantic model
    class's ``model_json_schema()``; a ValueError that says what was given otherwise."""
    if is_pydantic_model(schema):
        return schema.model_json_schema()  # type: ignore[union-attr]
    if isinstance(schema, str):
        return json_schema_object(schema, "schema")
    if not isinstance(schema, Mapping):
        raise ValueError(f"a JSON Schema must be a JSON object, not {type(schema).__name__}")
    return dict(schema)


def struct_from_json_schema(schema: str | Mapping[str, Any] | type) -> StructType:
    """``schema`` (a JSON Schema as a dict or text, or a pydantic model class) as a StructType, or
    a ValueError naming the first field the package cannot map and what to do."""
    root = json_schema_of(schema)
    defs = {**root.get("definitions", {}), **root.get("$defs", {})}
    data_type, _, _, _ = _field_type(root, defs, "", frozenset())
    if not isinstance(data_type, StructType) or not data_type.fields:
        raise ValueError("a JSON Schema for structured answers must be an object with at least one property "
                         "(\"type\": \"object\", \"properties\": {...}); answers are parsed into a struct")
    return data_type


def _refuse(path: str, what: str) -> ValueError:
    where = f"schema field {path!r}" if path else "the schema"
    return ValueError(f"{where} {what}, which has no Spark column form here; use string (with enum, format date "
                      "or date-time), integer, number, boolean, array with items, object with properties, or "
                      "object with additionalProperties, each possibly nullable")


def _resolved(spec: Any, defs: Mapping[str, Any], path: str, seen: frozenset) -> tuple[dict[str, Any], frozenset]:
    """``spec`` with its ``$ref`` (and a one-item ``allOf``) replaced by what it points to, the
    keys beside it kept; refs already followed on this path mark a recursive schema."""
    if not isinstance(spec, Mapping):
        raise _refuse(path, f"is {json.dumps(spec)}, not a schema object")
    spec = dict(spec)
    if "allOf" in spec:
        parts = spec.pop("allOf")
        if not isinstance(parts, list) or len(parts) != 1:
            raise _refuse(path, "combines schemas with allOf")
        spec = {**parts[0], **spec}
    if "$ref" in spec:
        ref = spec.pop("$ref")
        name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
        if not isinstance(ref, str) or ref.rsplit("/", 1)[0] not in ("#/$defs", "#/definitions") or name not in defs:
            raise _refuse(path, f"refers to {ref!r}, not to one of the schema's own $defs")
        if ref in seen:
            raise _refuse(path, f"refers to {ref!r} inside itself (a recursive schema)")
        seen = seen | {ref}
        return _resolved({**defs[name], **spec}, defs, path, seen)
    return spec, seen


def _field_type(spec: Any, defs: Mapping[str, Any], path: str,
                seen: frozenset) -> tuple[DataType, bool, list[str] | None, str | None]:
    """(Spark type, whether null is allowed, the enum of its strings or None, its description)."""
    spec, seen = _resolved(spec, defs, path, seen)
    unknown = sorted(set(spec) - _MAPPED - _IGNORED)
    if unknown:
        raise _refuse(path, f"uses {', '.join(unknown)}")
    description = spec.get("description") if isinstance(spec.get("description"), str) else None
    options = spec.get("anyOf", spec.get("oneOf"))
    if options is not None:
        return _one_of(spec, options, defs, path, seen, description)
    kinds = spec.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    nullable = "null" in kinds
    kinds = [kind for kind in kinds if kind != "null"]
    if "enum" in spec or "const" in spec:
        values = list(spec["enum"]) if "enum" in spec else [spec["const"]]
        nullable = nullable or None in values
        values = [value for value in values if value is not None]
        if not values or not all(isinstance(value, str) for value in values) or kinds not in ([], ["string"]):
            raise _refuse(path, f"has enum {json.dumps(values)}, not of strings")
        return StringType(), nullable, values, description
    if len(kinds) != 1:
        raise _refuse(path, f"has type {json.dumps(spec.get('type'))}" if kinds else "has no type")
    kind = kinds[0]
    if kind == "string" and "format" in spec:
        if spec["format"] not in _FORMATS:
            raise _refuse(path, f"has format {spec['format']!r}")
        return _FORMATS[spec["format"]], nullable, None, description
    if kind in _SCALARS:
        return _SCALARS[kind], nullable, None, description
    if kind == "array":
        if not isinstance(spec.get("items"), Mapping):
            raise _refuse(path, "is an array without one items schema")
        item, item_nullable, enum, _ = _field_type(spec["items"], defs, f"{path}[]", seen)
        return ArrayType(item, item_nullable), nullable, enum, description
    if kind == "object":
        return _object(spec, defs, path, seen), nullable, _map_enum(spec, defs, path, seen), description
    raise _refuse(path, f"has type {kind!r}")


def _one_of(spec: Mapping[str, Any], options: Any, defs: Mapping[str, Any], path: str, seen: frozenset,
            description: str | None) -> tuple[DataType, bool, list[str] | None, str | None]:
    """An ``anyOf``/``oneOf`` of one schema and null (pydantic's ``Optional[X]``): X, nullable."""
    typed = [option for option in options if option != {"type": "null"}] if isinstance(options, list) else []
    if len(typed) != 1 or "type" in spec:
        raise _refuse(path, "is one of several types (anyOf/oneOf)")
    data_type, _, enum, inner = _field_type(typed[0], defs, path, seen)
    return data_type, True, enum, description or inner


def _object(spec: Mapping[str, Any], defs: Mapping[str, Any], path: str, seen: frozenset) -> DataType:
    """An object with ``properties`` as a struct; one with only ``additionalProperties`` as a map."""
    properties = spec.get("properties")
    if isinstance(properties, Mapping) and properties:
        required = set(spec.get("required", []))
        fields = []
        for name, prop in properties.items():
            data_type, nullable, enum, description = _field_type(prop, defs, f"{path}{'.' if path else ''}{name}", seen)
            metadata = {**({"comment": description} if description else {}), **({ENUM_KEY: enum} if enum else {})}
            fields.append(StructField(name, data_type, nullable or name not in required, metadata))
        return StructType(fields)
    values = spec.get("additionalProperties")
    if isinstance(values, Mapping) and values:
        value, value_nullable, _, _ = _field_type(values, defs, f"{path}{{}}", seen)
        return MapType(StringType(), value, value_nullable)
    raise _refuse(path, "is an object without properties")


def _map_enum(spec: Mapping[str, Any], defs: Mapping[str, Any], path: str, seen: frozenset) -> list[str] | None:
    """The enum of a map's string values (kept on the map's field, as an array's is)."""
    values = spec.get("additionalProperties")
    if spec.get("properties") or not isinstance(values, Mapping) or not values:
        return None
    return _field_type(values, defs, f"{path}{{}}", seen)[2]
