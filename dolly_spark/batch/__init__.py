"""The summarize job: pending selection, staging, claims, incremental MERGE and progress, and the
demo that runs it on the embedded default."""
