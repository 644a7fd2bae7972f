"""Schemas as users write them (a JSON Schema as a dict or text, a pydantic model class) read into
the Spark struct the answers are parsed into, and the JSON Schema the answers are constrained to:
the same as the equivalent DDL where DDL can say it; an enum a STRING limited to its values;
what a struct cannot hold refused, naming the field. No Spark job runs here (DDL needs a session)."""
from __future__ import annotations

import datetime
import json
from enum import Enum
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

from dolly_spark.spark.structured import as_struct, json_schema

DDL = ("order_id STRING COMMENT 'the order number', refund_requested BOOLEAN NOT NULL, quantity BIGINT, "
       "opened DATE, items ARRAY<STRUCT<sku: STRING NOT NULL, price: DOUBLE>>, notes MAP<STRING, STRING>")
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": ["string", "null"], "description": "the order number"},
        "refund_requested": {"type": "boolean"},
        "quantity": {"type": "integer"},
        "opened": {"type": "string", "format": "date"},
        "items": {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]}},
        "notes": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
    },
    "required": ["refund_requested"],
    "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string"}, "price": {"type": "number"}},
                       "required": ["sku"]}},
}


class Item(BaseModel):
    sku: str
    price: Optional[float] = None


class Order(BaseModel):
    order_id: Optional[str] = Field(None, description="the order number")
    refund_requested: bool
    quantity: Optional[int] = None
    opened: Optional[datetime.date] = None
    items: Optional[list[Optional[Item]]] = None
    notes: Optional[dict[str, Optional[str]]] = None


class Mood(str, Enum):
    calm = "calm"
    angry = "angry"


class Triage(BaseModel):
    urgency: Literal["low", "medium", "high"]
    mood: Optional[Mood] = None
    tags: list[Literal["refund", "late"]]


def test_json_schema_text_and_pydantic_give_the_struct_and_constraint_of_the_equivalent_ddl(spark):
    ddl = as_struct(DDL)
    for form in (JSON_SCHEMA, json.dumps(JSON_SCHEMA), Order):
        struct = as_struct(form)
        assert struct == ddl, form
        assert json_schema(struct) == json_schema(ddl)


def test_an_enum_is_a_string_field_constrained_to_its_values_wherever_it_is():
    struct = as_struct(Triage)
    assert struct.simpleString() == "struct<urgency:string,mood:string,tags:array<string>>"
    constraint = json_schema(struct)["properties"]
    assert constraint["urgency"] == {"type": "string", "enum": ["low", "medium", "high"]}
    # Optional: null is one of its values too, or the constraint would refuse it.
    assert constraint["mood"] == {"type": ["string", "null"], "enum": ["calm", "angry", None]}
    assert constraint["tags"] == {"type": "array", "items": {"type": "string", "enum": ["refund", "late"]}}
    # The values are part of the schema's description, so another set is another request.
    assert as_struct({"type": "object", "properties": {"urgency": {"enum": ["low", "high"]}}}) != \
        as_struct({"type": "object", "properties": {"urgency": {"enum": ["low", "medium"]}}})


class Node(BaseModel):
    name: str
    children: list["Node"]


@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^A"}}}, "field 'code' uses pattern"),
    ({"type": "object", "properties": {"order": {"type": "object", "properties": {
        "level": {"enum": [1, 2]}}}}}, r"field 'order.level' has enum \[1, 2\], not of strings"),
    ({"type": "object", "properties": {"id": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
     "field 'id' is one of several types"),
    ('{"type": "object", "properties": {"lines": {"type": "array", "items": {"type": "object"}}}}',
     r"field 'lines\[\]' is an object without properties"),
    ({"type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}, "field 'x' refers to"),
    (Node, r"field 'children\[\]' refers to '#/\$defs/Node' inside itself"),
    ({"type": "array", "items": {"type": "string"}}, "must be an object with at least one property"),
    ('{"type": "object",', "not valid JSON"),
])
def test_a_schema_without_a_struct_form_is_refused_naming_the_field(schema, message):
    with pytest.raises(ValueError, match=message):
        as_struct(schema)
