"""The summarize job's test fixtures shared by the batch and Spark tests: six sample tickets (one
without text, one long) and a seventh without an id, a config for the tiny model, and the
one-row-per-ticket check of a target."""
from __future__ import annotations

from dolly_spark.batch.summarize import SummarizeConfig


TICKETS = [
    ("T-1", "HearthLink", "My thermostat shows E42 every morning."),
    ("T-2", "PayDesk", "I was charged twice for March, please refund one charge."),
    ("T-3", "PulseBuds", None),
    ("T-4", "Taskory", "Due dates move by a day when I drag cards. " * 10),
    ("T-5", "MeshWave", "Router drops Wi-Fi every evening at 8pm."),
    ("T-6", "Lumina", "Where did my photo albums go after the update?"),
    (None, "Lumina", "A ticket without an id cannot be keyed."),
]


def make_source(spark, table: str) -> str:
    spark.createDataFrame(TICKETS, "ticket_id STRING, product STRING, body STRING") \
        .write.format("delta").mode("overwrite").saveAsTable(table)
    return table


def config_for(source: str, target: str, model: str, **overrides) -> SummarizeConfig:
    settings = {"max_new_tokens": 6, "partitions": 2, "experiment": "tests", **overrides}
    return SummarizeConfig(source_table=source, target_table=target, model_uri=model, **settings)


def one_row_per_ticket(spark, target: str) -> dict[str, dict]:
    rows = spark.read.table(target).collect()
    ids = [row["ticket_id"] for row in rows]
    assert len(ids) == len(set(ids)), f"duplicate ticket ids in {target}: {ids}"
    return {row["ticket_id"]: row.asDict() for row in rows}
