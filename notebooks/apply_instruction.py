# Databricks notebook source
# MAGIC %md
# MAGIC # Apply an instruction to a table
# MAGIC
# MAGIC Runs one instruction over the rows of a table with a registered model and shows the results: a
# MAGIC `result` struct per row with the response, why generation stopped, any error, token counts and the
# MAGIC model version. With `output_table` set, the results are also saved there (overwritten). For large
# MAGIC tables and incremental runs use the summarize job instead. Run it on a GPU cluster (ML GPU runtime).
# MAGIC
# MAGIC **Classification.** Set `choices` to a comma-separated label set, e.g.
# MAGIC `billing, shipping, technical, account, feature request, question, feedback`, and the instruction to
# MAGIC `Triage this customer support ticket.`: each row gets exactly one of the labels, scored rather than
# MAGIC generated, in `result.label`, with `result.label_probability` and every label's probability in
# MAGIC `result.label_probabilities`.
# MAGIC
# MAGIC **Extraction.** Set `schema` to a Spark schema, e.g.
# MAGIC `order_id STRING COMMENT 'the order number as written', product STRING, refund_requested BOOLEAN`:
# MAGIC answers are JSON constrained to it and parsed into the typed struct `result.parsed`, so
# MAGIC `result.parsed.order_id` is a column like any other. Raise `max_new_tokens` to leave room for the JSON.
# MAGIC Both may be set at once.
# MAGIC
# MAGIC **Engine.** `auto` runs vLLM on GPU workers where it is installed (`%pip install vllm`), the
# MAGIC package's own engine elsewhere; both give the same greedy answers, and `result.engine` says which ran.
# MAGIC
# MAGIC The next cell installs the package from the bundle's synced source (the folder above this notebook
# MAGIC holds `setup.py`); with the wheel already attached to the cluster, skip it.

# COMMAND ----------

# MAGIC %pip install --quiet ..

# COMMAND ----------

dbutils.library.restartPython()

# COMMAND ----------

from dolly_spark import apply_instruction, configure_mlflow
from dolly_spark.job_config import parse_list

dbutils.widgets.text("source_table", "support_tickets", "Source table (catalog.schema.table)")
dbutils.widgets.text("instruction", "Summarize this text in one sentence.", "Instruction")
dbutils.widgets.text("input_col", "body", "Input column (the text the instruction applies to)")
dbutils.widgets.text("model_uri", "models:/support_dolly@champion", "Model URI (models:/catalog.schema.model@alias)")
dbutils.widgets.text("max_new_tokens", "128", "Longest response (tokens)")
dbutils.widgets.text("max_rows", "20", "Rows to process")
dbutils.widgets.text("output_table", "", "Save results to this table (empty: only display)")
dbutils.widgets.text("choices", "", "Classify into these labels, comma-separated (empty: free text)")
dbutils.widgets.text("schema", "", "Extract these fields, a Spark schema such as 'order_id STRING' (empty: none)")
dbutils.widgets.dropdown("engine", "auto", ["auto", "vllm", "hf"], "Engine (auto: vLLM on GPU workers that have it)")

# COMMAND ----------

output_table = dbutils.widgets.get("output_table").strip()
labels = parse_list(dbutils.widgets.get("choices"))
configure_mlflow()
results = apply_instruction(
    spark.read.table(dbutils.widgets.get("source_table")).limit(int(dbutils.widgets.get("max_rows"))),
    dbutils.widgets.get("instruction"),
    model_uri=dbutils.widgets.get("model_uri"),
    input_col=dbutils.widgets.get("input_col"),
    output_col="result",
    max_new_tokens=int(dbutils.widgets.get("max_new_tokens")),
    choices=labels or None,
    schema=dbutils.widgets.get("schema").strip() or None,
    engine=dbutils.widgets.get("engine"),
)
if output_table:
    # Display what was saved rather than the plan: displaying the plan would generate again.
    results.write.format("delta").mode("overwrite").saveAsTable(output_table)
    results = spark.read.table(output_table)
display(results)
