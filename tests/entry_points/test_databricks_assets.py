"""The Databricks assets hold together: thin notebooks, a bundle whose every task points at an entry
point in this repository, and job scripts whose ``--help`` works. No Spark, no workspace."""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))
JOB_SCRIPTS = sorted((REPO / "jobs").glob("*.py"))
NOTEBOOK_HEADER = "# Databricks notebook source"
WIDGET_DECLARATIONS = {"text", "dropdown", "combobox", "multiselect"}
TASK_KINDS = ("spark_python_task", "notebook_task", "run_job_task")

# Each notebook calls this one package function to do its work.
NOTEBOOK_ENTRY_POINTS = {
    "apply_instruction.py": "apply_instruction",
    "finetune.py": "run_finetune",
    "summarize_tickets.py": "run_summarize",
    "evaluate_and_promote.py": "run_evaluate_and_promote",
}


def _bundle() -> dict:
    return yaml.safe_load((REPO / "databricks.yml").read_text(encoding="utf-8"))


def _resource_files() -> list[Path]:
    return sorted({path for pattern in _bundle()["include"] for path in REPO.glob(pattern)})


def _jobs() -> list[tuple[Path, str, dict]]:
    """(resource file, job key, job) for every job of the bundle."""
    found = []
    for path in _resource_files():
        resources = yaml.safe_load(path.read_text(encoding="utf-8")).get("resources", {})
        found += [(path, key, job) for key, job in resources.get("jobs", {}).items()]
    return found


def _tasks() -> list[tuple[Path, str, dict]]:
    return [(path, f"{key}.{task['task_key']}", task) for path, key, job in _jobs() for task in job["tasks"]]


def _task_params() -> list:
    return [pytest.param(path, name, task, id=name) for path, name, task in _tasks()]


def _widget_calls(tree: ast.AST, method: str) -> list[ast.Call]:
    """Calls ``dbutils.widgets.<method>(...)`` in ``tree``."""
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method
        and ast.unparse(node.func.value) == "dbutils.widgets"
    ]


def _first_arg(call: ast.Call) -> str:
    assert call.args and isinstance(call.args[0], ast.Constant), f"widget name must be a literal: {ast.unparse(call)}"
    return call.args[0].value


# --- notebooks ---------------------------------------------------------------------------------

def test_the_four_notebooks_exist():
    assert {path.name for path in NOTEBOOKS} >= set(NOTEBOOK_ENTRY_POINTS)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_databricks_source_and_thin(notebook: Path):
    source = notebook.read_text(encoding="utf-8")
    assert source.splitlines()[0] == NOTEBOOK_HEADER
    tree = ast.parse(source, filename=str(notebook))  # "# MAGIC" lines are comments

    definitions = [node.name for node in ast.walk(tree)
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert not definitions, f"{notebook.name} defines {definitions}; logic belongs in the package"

    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dolly_spark"
        for alias in node.names
    }
    assert imported, f"{notebook.name} imports nothing from dolly_spark"
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert imported & called, f"{notebook.name} calls none of {sorted(imported)}"
    entry_point = NOTEBOOK_ENTRY_POINTS.get(notebook.name)
    if entry_point:
        assert entry_point in imported & called, f"{notebook.name} should call dolly_spark's {entry_point}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_imports_and_config_fields_exist(notebook: Path):
    """What a notebook imports from dolly_spark exists, and every keyword it passes to a dolly_spark
    name is one that name takes."""
    tree = ast.parse(notebook.read_text(encoding="utf-8"))
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dolly_spark":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{notebook.name}: {node.module} has no {alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    calls = [node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and callable(imported.get(node.func.id))]
    assert calls, f"{notebook.name} calls nothing it imports from dolly_spark"
    for node in calls:
        # The call's keywords bound against the real signature: a config field or an argument
        # the function does not take fails here, before any notebook runs.
        parameters = inspect.signature(imported[node.func.id]).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = {keyword.arg for keyword in node.keywords if keyword.arg} - set(parameters)
        assert not unknown, f"{notebook.name}: {node.func.id} takes no {sorted(unknown)}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_reads_every_widget_it_declares(notebook: Path):
    tree = ast.parse(notebook.read_text(encoding="utf-8"))
    declared = [_first_arg(call) for method in WIDGET_DECLARATIONS for call in _widget_calls(tree, method)]
    read = {_first_arg(call) for call in _widget_calls(tree, "get")}
    assert declared, f"{notebook.name} has no widgets: its parameters should be widgets"
    assert len(declared) == len(set(declared)), f"{notebook.name} declares a widget twice: {declared}"
    assert set(declared) == read, (f"{notebook.name}: declared but never read {sorted(set(declared) - read)}, "
                                   f"read but never declared {sorted(read - set(declared))}")


# --- the bundle --------------------------------------------------------------------------------

def test_bundle_definition():
    bundle = _bundle()
    assert bundle["bundle"]["name"] == "dolly_spark"
    assert "conf/resources/*.yml" in bundle["include"]
    assert bundle["targets"]["dev"]["mode"] == "development" and bundle["targets"]["dev"]["default"] is True
    assert bundle["targets"]["prod"]["mode"] == "production"
    assert {"catalog", "schema", "model_name"} <= set(bundle["variables"])
    wheels = [artifact for artifact in bundle["artifacts"].values() if artifact["type"] == "whl"]
    assert wheels and all((REPO / artifact["path"] / "setup.py").exists() for artifact in wheels)


def test_resource_files_parse_and_define_the_three_jobs():
    names = {path.name for path in _resource_files()}
    assert names >= {"summarize_tickets_job.yml", "finetune_job.yml", "evaluate_and_promote_job.yml"}
    for path in _resource_files():
        assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict), path
    assert {key for _, key, _ in _jobs()} >= {"summarize_tickets", "finetune", "evaluate_and_promote"}


def test_every_variable_used_is_declared():
    declared = set(_bundle()["variables"])
    texts = [(REPO / "databricks.yml").read_text(encoding="utf-8")]
    texts += [path.read_text(encoding="utf-8") for path in _resource_files()]
    used = {name for text in texts for name in re.findall(r"\$\{var\.(\w+)\}", text)}
    assert used <= declared, f"undeclared variables: {sorted(used - declared)}"


@pytest.mark.parametrize("resource_file, task_name, task", _task_params())
def test_task_points_at_an_entry_point_in_this_repo(resource_file: Path, task_name: str, task: dict):
    kinds = [kind for kind in TASK_KINDS if kind in task]
    assert len(kinds) == 1, f"{task_name}: expected one of {TASK_KINDS}, found {kinds}"
    here = resource_file.parent
    if "spark_python_task" in task:
        target = here / task["spark_python_task"]["python_file"]
        assert target.resolve().is_file(), f"{task_name}: {target} does not exist"
        assert target.resolve().parent == REPO / "jobs"
    elif "notebook_task" in task:
        target = here / task["notebook_task"]["notebook_path"]
        candidates = [target, target.with_name(target.name + ".py")]
        assert any(path.resolve().is_file() for path in candidates), f"{task_name}: notebook {target} does not exist"
    else:
        job_id = task["run_job_task"]["job_id"]
        match = re.fullmatch(r"\$\{resources\.jobs\.(\w+)\.id\}", job_id)
        assert match and match.group(1) in {key for _, key, _ in _jobs()}, f"{task_name}: runs unknown job {job_id}"
    for library in task.get("libraries", []):
        if "whl" in library:
            assert (here / library["whl"]).parent.resolve() == REPO / "dist", f"{task_name}: not the built wheel"


@pytest.mark.parametrize("resource_file, task_name, task",
                         [param for param in _task_params() if "spark_python_task" in param.values[2]])
def test_task_config_files_exist(resource_file: Path, task_name: str, task: dict):
    parameters = task["spark_python_task"].get("parameters", [])
    configs = [value for flag, value in zip(parameters, parameters[1:]) if flag == "--config"]
    assert len(configs) == 1, f"{task_name}: a job script's task names its config file once: {parameters}"
    relative = configs[0].removeprefix("${workspace.file_path}/")
    assert (REPO / relative).is_file(), f"{task_name}: --config {configs[0]}: {relative} is not in the repo"


@pytest.mark.parametrize("resource_file, task_name, task",
                         [param for param in _task_params() if "spark_python_task" in param.values[2]])
def test_task_flags_are_options_of_its_script(resource_file: Path, task_name: str, task: dict):
    script = Path(task["spark_python_task"]["python_file"]).name
    flags = [value for value in task["spark_python_task"].get("parameters", []) if value.startswith("--")]
    text = _help_of(script)
    unknown = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", text)]
    assert not unknown, f"{task_name}: jobs/{script} does not accept {unknown}"


def test_jobs_reference_their_own_clusters_and_tasks():
    for _, key, job in _jobs():
        clusters = {cluster["job_cluster_key"] for cluster in job.get("job_clusters", [])}
        task_keys = {task["task_key"] for task in job["tasks"]}
        for task in job["tasks"]:
            if "job_cluster_key" in task:
                assert task["job_cluster_key"] in clusters, f"{key}.{task['task_key']}: unknown cluster"
            for dependency in task.get("depends_on", []):
                assert dependency["task_key"] in task_keys, f"{key}.{task['task_key']}: unknown dependency"


def test_summarize_job_is_scheduled_on_gpus_one_task_per_gpu():
    job = next(job for _, key, job in _jobs() if key == "summarize_tickets")
    assert job["schedule"]["quartz_cron_expression"]
    for cluster in job["job_clusters"]:
        new_cluster = cluster["new_cluster"]
        assert new_cluster["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
        assert "gpu" in new_cluster["spark_version"] or new_cluster["spark_version"] == "${var.gpu_spark_version}"
    assert "gpu-ml" in _bundle()["variables"]["gpu_spark_version"]["default"]


# --- job scripts -------------------------------------------------------------------------------

@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=lambda path: path.name)
def test_job_script_calls_the_cli_under_main_guard(script: Path):
    tree = ast.parse(script.read_text(encoding="utf-8"))
    from_cli = {alias.asname or alias.name for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module == "dolly_spark.cli" for alias in node.names}
    guards = [node for node in tree.body if isinstance(node, ast.If)
              and ast.unparse(node.test) in ('__name__ == "__main__"', "__name__ == '__main__'")]
    assert guards, f"{script.name} has no `if __name__ == \"__main__\":`"
    called = {node.func.id for guard in guards for node in ast.walk(guard)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert from_cli & called, f"{script.name} calls no function of dolly_spark.cli under its main guard"


@functools.lru_cache(maxsize=None)
def _help_of(script: str) -> str:
    result = subprocess.run([sys.executable, f"jobs/{script}", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"jobs/{script} --help exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("script, flags", [
    ("summarize_tickets.py", ["--config", "--source-table", "--target-table", "--model-uri", "--instruction",
                              "--id-col", "--text-col"]),
    ("finetune.py", ["--config", "--base-model", "--train-data", "--model-name", "--max-steps"]),
    ("evaluate_and_promote.py", ["--config", "--model-name", "--eval-data", "--margin"]),
])
def test_job_script_help(script: str, flags: list[str]):
    text = _help_of(script)
    missing = [flag for flag in flags if flag not in text]
    assert not missing, f"jobs/{script} --help does not mention {missing}"


HELP_PROBE = """
import sys
from dolly_spark.cli import COMMANDS
try:
    COMMANDS[sys.argv[1]](["--help"])
except SystemExit:
    pass
print("imported:", sorted(name for name in ("mlflow", "torch", "transformers") if name in sys.modules))
"""


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_a_training_jobs_help_imports_no_model_or_tracking_library(command: str):
    """`--help` (and a bad flag) answer at once: the job imports torch, transformers and MLflow
    after its flags are parsed."""
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, command], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--max-eval-records" in result.stdout
    assert result.stdout.strip().endswith("imported: []"), result.stdout[-500:]
