"""dolly_spark: Dolly-style instruction-following models in batch over Spark and Delta.

Entry points: ``apply_instruction`` (a DataFrame in, the same DataFrame with a result struct
out), ``apply_request`` (the same for a ``Request`` built once, see ``build_request``),
``get_spark`` (the active or an embedded local Spark session with Delta) and
``configure_mlflow`` (the embedded local MLflow registry unless one is configured). Without
Spark: ``InstructionEngine`` (the "hf" engine), ``EngineConfig`` (how rows are run), ``Rows``
and ``Request`` (what they answer).
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["apply_instruction", "apply_request", "build_request", "configure_mlflow", "get_spark",
           "EngineConfig", "InstructionEngine", "Request", "Rows"]

_LAZY = {
    "apply_instruction": "dolly_spark.spark.apply",
    "apply_request": "dolly_spark.spark.apply",
    "build_request": "dolly_spark.request",
    "configure_mlflow": "dolly_spark.lifecycle.tracking",
    "get_spark": "dolly_spark.spark.sessions",
    "EngineConfig": "dolly_spark.inference.engines",
    "InstructionEngine": "dolly_spark.inference.engine",
    "Request": "dolly_spark.request",
    "Rows": "dolly_spark.inference.engines",
}


def __getattr__(name: str):
    # Imported on first use: the engine pulls in torch, the UDF pulls in pyspark, and a GPU
    # machine without Java or a driver without torch should import only what it uses.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dolly_spark' has no attribute {name!r}")
