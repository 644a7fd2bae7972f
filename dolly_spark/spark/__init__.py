"""Spark: ``apply_instruction`` and its pandas UDF, structured result columns, sessions, tables
and the local Spark install. Thin: batching, caching and parsing are the engine's."""
