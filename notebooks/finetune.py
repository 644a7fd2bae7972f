# Databricks notebook source
# MAGIC %md
# MAGIC # Fine-tune an instruction model
# MAGIC
# MAGIC Fine-tunes a base model on Dolly-style records (instruction, context, response), logs the run to
# MAGIC MLflow and registers the result as a new version of `model_name` with the alias `challenger`: the same
# MAGIC job as `jobs/finetune.py`, with widgets as its parameters. Run `evaluate_and_promote` next to make it
# MAGIC the `champion` if it wins. Run it on a single-node GPU cluster (ML GPU runtime).
# MAGIC
# MAGIC The next cell installs the package from the bundle's synced source (the folder above this notebook
# MAGIC holds `setup.py`); with the wheel already attached to the cluster, skip it.

# COMMAND ----------

# MAGIC %pip install --quiet ..

# COMMAND ----------

dbutils.library.restartPython()

# COMMAND ----------

from dolly_spark.lifecycle.tracking import configure_mlflow
from dolly_spark.training.finetune import FinetuneConfig, run_finetune

defaults = FinetuneConfig()
dbutils.widgets.text("base_model", defaults.base_model, "Base model (hub id, local checkpoint or models:/ URI)")
dbutils.widgets.text("train_data", defaults.train_data, "Training records: Delta table, JSONL path or databricks/databricks-dolly-15k")
dbutils.widgets.text("model_name", defaults.model_name, "Registered model (catalog.schema.model)")
dbutils.widgets.dropdown("prompt_format", defaults.prompt_format, ["auto", "dolly", "chat"], "Format trained in")
dbutils.widgets.text("epochs", str(defaults.epochs), "Passes over the training records")
dbutils.widgets.text("max_steps", str(defaults.max_steps), "Optimizer steps, overriding epochs (0: the epochs decide)")
dbutils.widgets.text("max_eval_records", str(defaults.max_eval_records), "Held-out records scored before and after")
dbutils.widgets.text("experiment", defaults.experiment, "MLflow experiment")
dbutils.widgets.text("num_processes", str(defaults.num_processes), "Training processes (one per GPU)")
dbutils.widgets.dropdown("launch", defaults.launch, ["local", "cluster"], "Processes on the driver node or the executors")
dbutils.widgets.dropdown("sharding", defaults.sharding, ["none", "fsdp", "zero3"], "Memory sharding across GPUs")
dbutils.widgets.text("checkpoint_dir", defaults.checkpoint_dir, "Checkpoints (a UC volume path; empty: project home)")

# COMMAND ----------

config = FinetuneConfig(
    base_model=dbutils.widgets.get("base_model"),
    train_data=dbutils.widgets.get("train_data"),
    model_name=dbutils.widgets.get("model_name"),
    prompt_format=dbutils.widgets.get("prompt_format"),
    epochs=float(dbutils.widgets.get("epochs")),
    max_steps=int(dbutils.widgets.get("max_steps")),
    max_eval_records=int(dbutils.widgets.get("max_eval_records")),
    experiment=dbutils.widgets.get("experiment"),
    num_processes=int(dbutils.widgets.get("num_processes")),
    launch=dbutils.widgets.get("launch"),
    sharding=dbutils.widgets.get("sharding"),
    checkpoint_dir=dbutils.widgets.get("checkpoint_dir"),
)
configure_mlflow(config.experiment)
report = run_finetune(config, spark=spark)
print(report)
