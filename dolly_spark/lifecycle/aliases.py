"""The registry aliases the jobs move: the version the summarize job runs, and the one a fine-tune
registers for the evaluation to judge."""

CHAMPION, CHALLENGER = "champion", "challenger"
