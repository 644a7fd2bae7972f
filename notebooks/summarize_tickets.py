# Databricks notebook source
# MAGIC %md
# MAGIC # Summarize support tickets
# MAGIC
# MAGIC Summarizes the tickets of a Delta table that have no result for the model's current version yet and
# MAGIC MERGEs the results into the target table, one row per ticket: the same job as `jobs/summarize_tickets.py`,
# MAGIC with widgets as its parameters. Run it on a GPU cluster (ML GPU runtime).
# MAGIC
# MAGIC The next cell installs the package from the bundle's synced source (the folder above this notebook
# MAGIC holds `setup.py`); with the wheel already attached to the cluster, skip it.

# COMMAND ----------

# MAGIC %pip install --quiet ..

# COMMAND ----------

dbutils.library.restartPython()

# COMMAND ----------

from dolly_spark.batch.preview import preview
from dolly_spark.batch.summarize import SummarizeConfig, run_summarize
from dolly_spark.lifecycle.tracking import configure_mlflow

defaults = SummarizeConfig()
dbutils.widgets.text("source_table", defaults.source_table, "Source table (catalog.schema.table)")
dbutils.widgets.text("target_table", defaults.target_table, "Target table (catalog.schema.table)")
dbutils.widgets.text("model_uri", defaults.model_uri, "Model URI (models:/catalog.schema.model@champion)")
dbutils.widgets.text("instruction", defaults.instruction, "Instruction")
dbutils.widgets.text("id_col", defaults.id_col, "Ticket id column")
dbutils.widgets.text("text_col", defaults.text_col, "Ticket text column")
dbutils.widgets.text("max_new_tokens", str(defaults.max_new_tokens), "Longest summary (tokens)")
dbutils.widgets.text("max_rows", str(defaults.max_rows), "Most tickets this run (0: all pending)")
dbutils.widgets.text("experiment", defaults.experiment, "MLflow experiment")
dbutils.widgets.text("shared_model_dir", defaults.shared_model_dir,
                     "Model files for executors without registry access (a UC Volume path; empty: none)")
dbutils.widgets.dropdown("engine", defaults.engine, ["auto", "vllm", "hf"], "Engine (auto: vLLM on GPU workers that have it)")

# COMMAND ----------

config = SummarizeConfig(
    source_table=dbutils.widgets.get("source_table"),
    target_table=dbutils.widgets.get("target_table"),
    model_uri=dbutils.widgets.get("model_uri"),
    instruction=dbutils.widgets.get("instruction"),
    id_col=dbutils.widgets.get("id_col"),
    text_col=dbutils.widgets.get("text_col"),
    max_new_tokens=int(dbutils.widgets.get("max_new_tokens")),
    max_rows=int(dbutils.widgets.get("max_rows")),
    experiment=dbutils.widgets.get("experiment"),
    shared_model_dir=dbutils.widgets.get("shared_model_dir"),
    engine=dbutils.widgets.get("engine"),
)
configure_mlflow(config.experiment)
report = run_summarize(spark, config)
print(report)

# COMMAND ----------

print(preview(spark, config))
