"""The inference wing: engines by name behind one seam, and the "hf" engine's parts, each with one job.

- ``engines``: ``EngineConfig`` (how rows are run), ``Rows``, the ``Engine`` interface and the
  registry of named engines;
- ``engine``: ``InstructionEngine``, the "hf" engine, which composes the parts below;
- ``prepared``: what the engine builds once per request (encoders, backends, grammar, scorer);
- ``results``: per-row results and the engine's counters;
- ``encoder``: instruction and input to prompt token ids, with truncation;
- ``planner``: pure functions from token lengths to micro-batches, prefill groups and the
  prompt prefix a micro-batch shares;
- ``backend``: what every generation backend is built with and shares;
- ``static_batching`` and ``continuous_batching``: the two backends;
- ``ragged_attention``: decoding attention over each row's live cache columns;
- ``packed_weights``: on a CPU, decoding steps on weights packed once for MKL's GEMM kernel;
- ``repetition``: repetition penalty and n-gram ban over each row's own answer;
- ``parser``: generated tokens to a response and a finish reason (and a JSON answer's check);
- ``choices``: classification by scoring each row's prompt against a fixed label set;
- ``constrained``: the JSON-schema grammar (llguidance) that masks what a row may generate;
- ``devices``: the device and precision a model runs in.
"""
