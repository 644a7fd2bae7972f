"""The instruction engine's parts, each with one job; ``dolly_spark.engine`` composes them.

- ``results``: generation settings, per-row results and the engine's counters;
- ``encoder``: instruction and input to prompt token ids, with truncation;
- ``planner``: pure functions from token lengths to micro-batches, prefill groups and the
  prompt prefix a micro-batch shares;
- ``generators``: the backend interface, and what every backend shares;
- ``static_batching`` and ``continuous_batching``: the two backends;
- ``packed_weights``: on a CPU, decoding steps on weights packed once for MKL's GEMM kernel;
- ``repetition``: repetition penalty and n-gram ban over each row's own answer;
- ``parser``: generated tokens to a response and a finish reason (and a JSON answer's check);
- ``choices``: classification by scoring each row's prompt against a fixed label set;
- ``constrained``: the JSON-schema grammar (llguidance) that masks what a row may generate.
"""
