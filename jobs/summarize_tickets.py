"""spark-submit jobs/summarize_tickets.py --config conf/summarize_tickets.yaml [overrides]

Summarizes the tickets of a source Delta table that have no result for the current model
version yet, and MERGEs the results into the target table. See ``--help``.
"""
import sys

from dolly_spark.cli import summarize_main

if __name__ == "__main__":
    sys.exit(summarize_main())
