"""dolly_spark: Dolly-style instruction-following models in batch over Spark and Delta.

Entry points: ``apply_instruction`` (a DataFrame in, the same DataFrame with a result struct
out), ``get_spark`` (the active or an embedded local Spark session with Delta) and
``configure_mlflow`` (the embedded local MLflow registry unless one is configured).
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["apply_instruction", "configure_mlflow", "get_spark", "InstructionEngine", "GenerationSettings"]

_LAZY = {
    "apply_instruction": "dolly_spark.udf",
    "configure_mlflow": "dolly_spark.tracking",
    "get_spark": "dolly_spark.sessions",
    "InstructionEngine": "dolly_spark.engine",
    "GenerationSettings": "dolly_spark.engine",
}


def __getattr__(name: str):
    # Imported on first use: the engine pulls in torch, the UDF pulls in pyspark, and a GPU
    # machine without Java or a driver without torch should import only what it uses.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dolly_spark' has no attribute {name!r}")
