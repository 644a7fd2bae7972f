"""Structured answers on Spark: a Spark schema as the JSON Schema answers are constrained to, and
the typed fields the result struct gains.

``apply_instruction(..., schema="order_id STRING, refund_requested BOOLEAN")`` takes a DDL string,
a ``StructType``, or a JSON Schema (a dict or its text) or pydantic model class, which
``schema_forms`` reads into a ``StructType`` (a field with an ``enum`` keeps its values in its
metadata, ``ENUM_KEY``: a STRING that may hold only those). The engine generates JSON under the
JSON Schema made from the struct here (every field required, nullable fields may be null, a
field's COMMENT becomes its description, which the prompt shows the model); Spark's own
``from_json`` then parses the text into the struct ``parsed``, typed exactly as asked, so users
select ``response.parsed.order_id``. ``choices`` add ``label``, ``label_probability`` and
``label_probabilities`` (a map from each choice to its probability).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    ByteType,
    CharType,
    DataType,
    DateType,
    DecimalType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    ShortType,
    StringType,
    StructField,
    StructType,
    TimestampNTZType,
    TimestampType,
    VarcharType,
)

from dolly_spark.spark.schema_forms import ENUM_KEY, is_pydantic_model, struct_from_json_schema

LABEL_FIELDS = [StructField("label", StringType()), StructField("label_probability", DoubleType())]
LABEL_MAP_FIELD = StructField("label_probabilities", MapType(StringType(), DoubleType()))
# What the UDF returns for the map: the probabilities in the order of the choices, which Spark
# then pairs with the choices (an array crosses Arrow more simply than a map).
CHOICE_PROBABILITIES_FIELD = StructField("choice_probabilities", ArrayType(DoubleType()))
PARSED_FIELD = "parsed"
# Every field structured answers add to a result struct.
STRUCTURED_FIELDS = (*(field.name for field in LABEL_FIELDS), LABEL_MAP_FIELD.name, PARSED_FIELD)

_JSON_TYPES: list[tuple[tuple[type, ...], dict[str, Any]]] = [
    ((StringType, VarcharType, CharType), {"type": "string"}),
    ((BooleanType,), {"type": "boolean"}),
    # Bounded so every answer fits its column: from_json would make an overflow null.
    ((ByteType,), {"type": "integer", "minimum": -2**7, "maximum": 2**7 - 1}),
    ((ShortType,), {"type": "integer", "minimum": -2**15, "maximum": 2**15 - 1}),
    ((IntegerType,), {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}),
    ((LongType,), {"type": "integer", "minimum": -2**63, "maximum": 2**63 - 1}),
    ((FloatType, DoubleType, DecimalType), {"type": "number"}),
    ((DateType,), {"type": "string", "format": "date"}),
    ((TimestampType, TimestampNTZType), {"type": "string", "format": "date-time"}),
]


def as_struct(schema: str | StructType | Mapping[str, Any] | type) -> StructType:
    """``schema`` as a StructType: a DDL string such as "order_id STRING, amount DOUBLE", a
    StructType, a JSON Schema (a dict, or its text: text that starts with "{") or a pydantic
    model class. A ValueError that quotes it, or names the field that cannot be mapped, when it
    is none of these."""
    if isinstance(schema, StructType):
        struct = schema
    elif isinstance(schema, Mapping) or is_pydantic_model(schema) or (
            isinstance(schema, str) and schema.lstrip().startswith("{")):
        struct = struct_from_json_schema(schema)
    elif isinstance(schema, str) and schema.strip():
        try:
            struct = DataType.fromDDL(schema)
        except Exception as exc:  # noqa: BLE001 - Spark's parse errors arrive in several types
            raise ValueError(f"schema {schema!r} is not a Spark DDL schema such as "
                             f"'order_id STRING, refund_requested BOOLEAN': {str(exc).splitlines()[0]}") from None
    else:
        raise ValueError(f"schema must be a DDL string, a StructType, a JSON Schema or a pydantic model class, "
                         f"not {schema!r}")
    if not isinstance(struct, StructType) or not struct.fields:
        raise ValueError(f"schema {schema!r} must name at least one field, e.g. 'order_id STRING'")
    json_schema(struct)  # every field's type must have a JSON form
    return struct


def json_schema(struct: StructType) -> dict[str, Any]:
    """The JSON Schema of an object with ``struct``'s fields: all required, nullable ones may be
    null, no other keys; a field's COMMENT is its description, its ``ENUM_KEY`` metadata the
    values its strings may take."""
    return _object(struct, path="")


def _object(struct: StructType, path: str) -> dict[str, Any]:
    properties = {field.name: _field(field, f"{path}{field.name}") for field in struct.fields}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _field(field: StructField, path: str) -> dict[str, Any]:
    spec = _value(field.dataType, path, _enum(field, path))
    comment = (field.metadata or {}).get("comment")
    if comment:
        spec["description"] = comment
    return _nullable(spec) if field.nullable else spec


def _enum(field: StructField, path: str) -> list[str] | None:
    values = (field.metadata or {}).get(ENUM_KEY)
    if values is None:
        return None
    if not isinstance(values, list) or not values or not all(isinstance(value, str) for value in values):
        raise ValueError(f"schema field {path!r} has {ENUM_KEY} {values!r} in its metadata; give a list of strings")
    return values


def _value(data_type: DataType, path: str, enum: list[str] | None = None) -> dict[str, Any]:
    if enum is not None and isinstance(data_type, (StringType, VarcharType, CharType)):
        return {"type": "string", "enum": list(enum)}
    if enum is not None and not isinstance(data_type, (ArrayType, MapType)):
        raise ValueError(f"schema field {path!r} has an {ENUM_KEY} but type {data_type.simpleString()}; an enum "
                         "holds strings (a STRING field, or an array or map of strings)")
    for types, spec in _JSON_TYPES:
        if isinstance(data_type, types):
            return dict(spec)
    if isinstance(data_type, StructType):
        return _object(data_type, f"{path}.")
    if isinstance(data_type, ArrayType):
        items = _value(data_type.elementType, f"{path}[]", enum)
        return {"type": "array", "items": _nullable(items) if data_type.containsNull else items}
    if isinstance(data_type, MapType) and isinstance(data_type.keyType, StringType):
        values = _value(data_type.valueType, f"{path}{{}}", enum)
        return {"type": "object", "additionalProperties": _nullable(values) if data_type.valueContainsNull else values}
    raise ValueError(f"schema field {path!r} has type {data_type.simpleString()}, which has no JSON form here; use "
                     "strings, numbers, booleans, dates, timestamps, arrays, structs or maps with string keys")


def _nullable(spec: dict[str, Any]) -> dict[str, Any]:
    # A keyword such as "format" or "properties" applies only to values of its own type, so a
    # null passes them: adding "null" to the type is enough. "enum" applies to every value, so
    # null joins its values.
    if "enum" in spec:
        return {**spec, "type": [spec["type"], "null"], "enum": [*spec["enum"], None]}
    return {**spec, "type": [spec["type"], "null"]}


def udf_fields(choices: Sequence[str]) -> list[StructField]:
    """The fields the pandas UDF returns beside the plain result's, for ``choices``."""
    return [*LABEL_FIELDS, CHOICE_PROBABILITIES_FIELD] if choices else []


def result_fields(choices: Sequence[str], struct: StructType | None) -> list[StructField]:
    """The fields a result struct gains: the label's with ``choices``, ``parsed`` with a schema."""
    fields = [*LABEL_FIELDS, LABEL_MAP_FIELD] if choices else []
    if struct is not None:
        fields.append(StructField(PARSED_FIELD, struct))
    return fields


def structured_columns(raw: Column, choices: Sequence[str], struct: StructType | None) -> list[Column]:
    """From the UDF's struct ``raw``: the label fields, with the probabilities as a map from each
    choice, and ``parsed``, the answer's JSON typed by ``struct`` (null when the row has an
    error: its raw text stays in ``response``)."""
    columns = []
    if choices:
        names = F.array(*[F.lit(choice) for choice in choices])
        columns += [raw["label"].alias("label"), raw["label_probability"].alias("label_probability"),
                    F.map_from_arrays(names, raw["choice_probabilities"]).alias(LABEL_MAP_FIELD.name)]
    if struct is not None:
        columns.append(F.when(raw["error"].isNull(), F.from_json(raw["response"], struct)).alias(PARSED_FIELD))
    return columns


def describe(struct: StructType | None) -> str | None:
    """The schema as stable text, for fingerprints: its JSON form, comments included."""
    return None if struct is None else json.dumps(struct.jsonValue(), sort_keys=True)
