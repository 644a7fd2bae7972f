"""Seed a clean project home the way `make demo` does, with a tiny model in place of the demo's:
``python tests/seed_project_home.py <tiny model dir>`` with ``DOLLY_SPARK_HOME`` set.

It creates the Delta table ``support_tickets`` from the sample tickets the package ships and
registers the tiny model as ``support_dolly`` version 1 with alias ``champion``: what the README's
job commands expect to find. It runs in its own process because the embedded Derby metastore
admits one JVM at a time."""
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from dolly_spark.batch.demo import ensure_sample_tickets_table
from dolly_spark.lifecycle.registry import CHAMPION, log_and_register
from dolly_spark.spark.sessions import get_spark
from dolly_spark.lifecycle.tracking import configure_mlflow


def register_champion(model_dir: str) -> str:
    """Register the checkpoint in ``model_dir`` as ``support_dolly`` (Dolly format), alias
    champion, in the current MLflow registry; return its version."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return log_and_register(model, tokenizer, "support_dolly", "dolly", alias=CHAMPION)


if __name__ == "__main__":
    model_dir = sys.argv[1]
    configure_mlflow("dolly_spark")
    spark = get_spark("seed-project-home", master="local[1]", ui=False)
    ensure_sample_tickets_table(spark, "support_tickets")
    spark.stop()
    register_champion(model_dir)
