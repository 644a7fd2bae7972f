"""spark-submit jobs/evaluate_and_promote.py --config conf/evaluate_and_promote.yaml [overrides]

Evaluates the model's ``challenger`` against its ``champion`` on held-out records and moves the
``champion`` alias to the challenger when it wins by the configured margin. See ``--help``.
"""
import sys

from dolly_spark.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
