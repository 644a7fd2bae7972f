"""spark-submit jobs/finetune.py --config conf/finetune.yaml [overrides]

Fine-tunes a base model on Dolly-style records, logs the run to MLflow, registers the result
as a new version of the model and gives it the alias ``challenger``. See ``--help``.
"""
import sys

from dolly_spark.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
