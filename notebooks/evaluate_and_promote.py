# Databricks notebook source
# MAGIC %md
# MAGIC # Evaluate the challenger and promote it
# MAGIC
# MAGIC Evaluates the `challenger` version of `model_name` against its `champion` on held-out records, logs
# MAGIC both to MLflow, and moves the `champion` alias to the challenger when it wins by at least `margin`:
# MAGIC the same job as `jobs/evaluate_and_promote.py`, with widgets as its parameters. Run it on a GPU cluster
# MAGIC (ML GPU runtime).
# MAGIC
# MAGIC The next cell installs the package from the bundle's synced source (the folder above this notebook
# MAGIC holds `setup.py`); with the wheel already attached to the cluster, skip it.

# COMMAND ----------

# MAGIC %pip install --quiet ..

# COMMAND ----------

dbutils.library.restartPython()

# COMMAND ----------

from dolly_spark.lifecycle.tracking import configure_mlflow
from dolly_spark.training.evaluate import EvaluateConfig, run_evaluate_and_promote

defaults = EvaluateConfig()
dbutils.widgets.text("model_name", defaults.model_name, "Registered model (catalog.schema.model)")
dbutils.widgets.text("eval_data", defaults.eval_data, "The fine-tune's train_data (its held-out share is scored)")
dbutils.widgets.text("max_eval_records", str(defaults.max_eval_records), "Held-out records each version is scored on")
dbutils.widgets.text("margin", str(defaults.margin), "How much better the challenger must score")
dbutils.widgets.text("experiment", defaults.experiment, "MLflow experiment")

# COMMAND ----------

config = EvaluateConfig(
    model_name=dbutils.widgets.get("model_name"),
    eval_data=dbutils.widgets.get("eval_data"),
    max_eval_records=int(dbutils.widgets.get("max_eval_records")),
    margin=float(dbutils.widgets.get("margin")),
    experiment=dbutils.widgets.get("experiment"),
)
configure_mlflow(config.experiment)
report = run_evaluate_and_promote(config, spark=spark)
print(report)
