"""The spark wing's modules import one another without a cycle, counting imports made inside
functions too: a cycle hidden in a function works only in the order the modules happen to be
imported in, and keeps two modules from being understood apart. A job's driver imports neither
torch nor transformers: only the executors' Python workers run a model."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dolly_spark.spark

WING = Path(dolly_spark.spark.__file__).parent


def imported_siblings(path: Path) -> set[str]:
    """The modules of the spark wing that the module at ``path`` imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dolly_spark.spark."):
            names.add(node.module.removeprefix("dolly_spark.spark."))
        elif isinstance(node, ast.Import):
            names.update(alias.name.removeprefix("dolly_spark.spark.") for alias in node.names
                         if alias.name.startswith("dolly_spark.spark."))
    return names


def test_the_spark_wing_has_no_import_cycle():
    graph = {path.stem: imported_siblings(path) for path in WING.glob("*.py")}
    cycles = []

    def follow(start: str, module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported == start:
                cycles.append(" -> ".join([*path, imported]))
            elif imported not in path:
                follow(start, imported, [*path, imported])

    for module in sorted(graph):
        follow(module, module, [module])
    assert graph["sessions"] and graph["install"], graph  # the walk sees imports at all
    assert not cycles, cycles


def test_a_jobs_driver_imports_no_model_library():
    """The summarize job's and apply_instruction's modules, imported as a job's driver imports
    them: torch and transformers there took about 7 s of every job's start (a fresh process)."""
    probe = ("import sys, dolly_spark.batch.summarize, dolly_spark.spark.apply; "
             "print(sorted(name for name in ('torch', 'transformers', 'vllm') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
