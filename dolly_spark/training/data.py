"""Instruction records (the databricks-dolly-15k schema): loading, validation and the split.

A record has ``instruction``, ``context``, ``response`` and ``category``. Records come from a
Delta table, a JSONL file, or (with network) the hub dataset ``databricks/databricks-dolly-15k``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FIELDS = ("instruction", "context", "response", "category")
HUB_DATASET = "databricks/databricks-dolly-15k"


@dataclass
class RecordSource:
    """Where records came from, precisely enough to find the same data again."""

    kind: str  # "delta", "jsonl" or "hub"
    name: str
    version: str  # Delta version, file sha256, or hub revision

    def as_params(self) -> dict[str, str]:
        return {"train_data_kind": self.kind, "train_data": self.name, "train_data_version": self.version}


@dataclass
class Validation:
    """The records kept, and how many were skipped for each reason."""

    kept: list[dict[str, str]]
    skipped: Counter = field(default_factory=Counter)


def load_records(train_data: str, spark: Any = None, delta_version_as_of: int | None = None
                 ) -> tuple[list[dict[str, Any]], RecordSource]:
    """Records from a JSON Lines path, a Delta table name (its latest version, or
    ``delta_version_as_of``), or the dolly-15k hub dataset."""
    path = Path(train_data).expanduser()
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"training data file {str(path)!r} does not exist")
        raw = path.read_bytes()
        try:
            records = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON Lines (one JSON record per line): {exc}") from exc
        return records, RecordSource("jsonl", str(path.resolve()), hashlib.sha256(raw).hexdigest())
    if train_data == HUB_DATASET:
        return _load_hub_dataset(train_data)
    return _load_delta_table(train_data, spark, delta_version_as_of)


def _load_delta_table(table: str, spark: Any, version_as_of: int | None) -> tuple[list[dict[str, Any]], RecordSource]:
    from dolly_spark.spark.sessions import get_spark
    from dolly_spark.spark.tables import delta_version, require_columns, require_table

    spark = spark or get_spark("dolly_spark-finetune")
    df = require_table(spark, table, "training table")
    require_columns(df, {"instruction column": "instruction", "response column": "response"}, f"table {table!r}")
    version = delta_version(spark, table) if version_as_of is None else version_as_of
    # Read the version we record, so the run's lineage names exactly the data it trained on.
    snapshot = spark.read.option("versionAsOf", version).table(table)
    columns = [c for c in FIELDS if c in snapshot.columns]
    records = [row.asDict() for row in snapshot.select(*columns).collect()]
    return records, RecordSource("delta", table, str(version))


def _load_hub_dataset(name: str) -> tuple[list[dict[str, Any]], RecordSource]:
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(f"loading {name} from the hub needs the `datasets` package: pip install datasets") from exc
    dataset = datasets.load_dataset(name, split="train")
    return [dict(row) for row in dataset], RecordSource("hub", name, dataset._fingerprint)


def validate_records(records: list[dict[str, Any]], max_chars: int = 20_000) -> Validation:
    """Keep records with a non-empty instruction and response under ``max_chars``; count the rest.

    Token-level length is checked again when examples are encoded.
    """
    result = Validation(kept=[])
    for record in records:
        instruction = _text(record.get("instruction"))
        response = _text(record.get("response"))
        context = _text(record.get("context"))
        if not instruction:
            result.skipped["empty_instruction"] += 1
        elif not response:
            result.skipped["empty_response"] += 1
        elif len(instruction) + len(context) + len(response) > max_chars:
            result.skipped["too_long"] += 1
        else:
            result.kept.append({"instruction": instruction, "context": context, "response": response,
                                "category": _text(record.get("category")) or "unknown"})
    if result.skipped:
        log.warning("skipped %d of %d records: %s", sum(result.skipped.values()), len(records), dict(result.skipped))
    return result


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def stratified_split(records: list[dict[str, str]], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): each category contributes ``eval_fraction`` of its records (rounded, at
    least one when it has two or more) to eval; the same seed gives the same split. The eval
    records take the categories in turn, so its first n (a scoring cap) are stratified too."""
    rng = random.Random(seed)
    by_category: dict[str, list] = defaultdict(list)
    for record in records:
        by_category[record["category"]].append(record)
    train, held_out_by_category = [], []
    for category in sorted(by_category):
        # Sorted first, so the split depends on the records and the seed, not on the order a
        # table scan returned them in.
        group = sorted(by_category[category], key=lambda r: (r["instruction"], r["context"], r["response"]))
        rng.shuffle(group)
        count = round(len(group) * eval_fraction) if eval_fraction > 0 else 0
        if eval_fraction > 0 and len(group) >= 2:
            count = max(1, count)
        held_out_by_category.append(group[:count])
        train += group[count:]
    return train, [record for turn in zip_longest(*held_out_by_category) for record in turn if record is not None]
