"""What tests and benchmarks build (tiny models, in seconds, without network) and measure (the
table scans Spark ran). Not used by the library itself."""
