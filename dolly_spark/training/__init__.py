"""Fine-tuning: Dolly-style instruction tuning tracked in MLflow, evaluation and promotion."""
