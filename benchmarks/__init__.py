"""Side-by-side throughput benchmarks of dolly_spark (not tests). Entry point: ``python -m benchmarks.run_all``."""
