"""The Databricks notebooks run top to bottom, as a job would run them: on the test session's local
Spark with Delta and a temporary MLflow registry, with stand-ins for ``dbutils`` and ``display``.

Each notebook's code cells run in order in one namespace that holds ``spark``, ``dbutils`` and
``display``, as on Databricks; ``# MAGIC`` cells (markdown, ``%pip``) are skipped, and
``dbutils.library.restartPython()`` clears the namespace as a restart would. Job parameters are
given as widget values (strings), overriding the widget defaults. The package functions run for
real, so a keyword a notebook misspells, or a widget value it does not convert to the type the
function takes, fails here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import checked_schema_answer, shared_sample

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOK_HEADER = "# Databricks notebook source"
CELL_SEPARATOR = "# COMMAND ----------"
PACKAGE_TICKETS = REPO / "dolly_spark" / "data" / "sample_tickets.jsonl"
EXPERIMENT = "notebook_runs"

# The one package function each notebook exists to call: (module, attribute).
ENTRY_POINTS = {
    "apply_instruction.py": ("dolly_spark.spark.apply", "apply_instruction"),
    "summarize_tickets.py": ("dolly_spark.batch.summarize", "run_summarize"),
    "finetune.py": ("dolly_spark.training.finetune", "run_finetune"),
    "evaluate_and_promote.py": ("dolly_spark.training.evaluate", "run_evaluate_and_promote"),
}


# --- stand-ins for what Databricks provides --------------------------------------------------

class Widgets:
    """``dbutils.widgets``: a declared widget reads the job parameter of its name when the job
    passed one, its default otherwise. Parameters are strings, as a job passes them."""

    def __init__(self, parameters: dict[str, str]):
        wrong = {name: value for name, value in parameters.items() if not isinstance(value, str)}
        assert not wrong, f"job parameters are strings; got {wrong}"
        self.parameters = dict(parameters)
        self.declared: dict[str, dict[str, Any]] = {}

    def _declare(self, name: str, default: str, label: str | None, choices: list[str] | None = None) -> None:
        assert isinstance(name, str) and isinstance(default, str), f"widget {name!r}: default {default!r} is not a string"
        if choices is not None:
            assert default in choices, f"widget {name!r}: default {default!r} is not one of {choices}"
            value = self.parameters.get(name, default)
            assert value in choices, f"widget {name!r}: parameter {value!r} is not one of {choices}"
        self.declared[name] = {"default": default, "label": label, "choices": choices}

    def text(self, name: str, defaultValue: str, label: str | None = None) -> None:  # noqa: N803 - dbutils' names
        self._declare(name, defaultValue, label)

    def dropdown(self, name: str, defaultValue: str, choices: list[str], label: str | None = None) -> None:  # noqa: N803
        self._declare(name, defaultValue, label, list(choices))

    def combobox(self, name: str, defaultValue: str, choices: list[str], label: str | None = None) -> None:  # noqa: N803
        self._declare(name, defaultValue, label)

    def get(self, name: str) -> str:
        if name not in self.declared and name not in self.parameters:
            raise ValueError(f"InputWidgetNotDefined: no input widget named {name}")
        return self.parameters.get(name, self.declared.get(name, {}).get("default"))

    def undeclared_parameters(self) -> set[str]:
        return set(self.parameters) - set(self.declared)


class Library:
    """``dbutils.library``: ``restartPython`` only records that it was called."""

    def __init__(self):
        self.restarts = 0

    def restartPython(self) -> None:  # noqa: N802 - dbutils' name
        self.restarts += 1


class DBUtils:
    def __init__(self, parameters: dict[str, str]):
        self.widgets = Widgets(parameters)
        self.library = Library()


class Display:
    """``display``: records what it was given."""

    def __init__(self):
        self.shown: list[Any] = []

    def __call__(self, value: Any = None, *args, **kwargs) -> None:
        self.shown.append(value)


class EntryPointSpy:
    """Wraps a package function: checks the call against the real signature and type hints, runs
    the real function, and records the call and what it returned (or raised)."""

    def __init__(self, function):
        self.function = function
        self.signature = inspect.signature(function)
        self.hints = typing.get_type_hints(function)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)  # a misspelled or missing argument fails here
        for name, value in bound.arguments.items():
            _check_type(f"{self.function.__name__}({name}=...)", value, self.hints.get(name, Any))
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                _check_config(value)
        call = {"arguments": dict(bound.arguments)}
        self.calls.append(call)
        try:
            call["result"] = self.function(*args, **kwargs)
        except BaseException as exc:
            call["raised"] = exc
            raise
        return call["result"]


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return True


def _check_type(where: str, value: Any, hint: Any) -> None:
    if not _matches(value, hint):
        raise TypeError(f"{where} is {value!r} ({type(value).__name__}), not {hint}: convert the widget value")


def _check_config(config: Any) -> None:
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        _check_type(f"{type(config).__name__}.{item.name}", getattr(config, item.name), hints.get(item.name, Any))


# --- running a notebook --------------------------------------------------------------------------

@dataclass
class Cell:
    first_line: int  # line of the notebook file the cell starts on
    source: str

    @property
    def is_magic(self) -> bool:
        lines = [line for line in self.source.splitlines() if line.strip()]
        return bool(lines) and all(line.startswith("# MAGIC") for line in lines)


def notebook_cells(source: str, name: str) -> list[Cell]:
    """The cells of a notebook in Databricks source format."""
    lines = source.splitlines()
    assert lines and lines[0] == NOTEBOOK_HEADER, f"{name} does not start with {NOTEBOOK_HEADER!r}"
    cells, start, current = [], 2, []
    for number, line in enumerate(lines[1:], start=2):
        if line.strip() == CELL_SEPARATOR:
            cells.append(Cell(start, "\n".join(current)))
            start, current = number + 1, []
        else:
            current.append(line)
    cells.append(Cell(start, "\n".join(current)))
    return [cell for cell in cells if cell.source.strip()]


@dataclass
class NotebookRun:
    namespace: dict[str, Any]
    dbutils: DBUtils
    display: Display
    printed: str
    entry_point: EntryPointSpy
    cells_run: int = 0
    seconds: float = 0.0
    magic_cells_skipped: int = 0

    @property
    def result(self) -> Any:
        """What the notebook's one call of its entry point returned."""
        assert len(self.entry_point.calls) == 1, f"expected one call of the entry point, got {len(self.entry_point.calls)}"
        call = self.entry_point.calls[0]
        assert "result" in call, f"the entry point raised {call.get('raised')!r}"
        return call["result"]


def run_notebook(name: str, spark, parameters: dict[str, str], source: str | None = None) -> NotebookRun:
    """Run notebook ``name`` top to bottom with ``parameters`` as its job parameters."""
    path = NOTEBOOK_DIR / name
    source = path.read_text(encoding="utf-8") if source is None else source
    dbutils, display = DBUtils(parameters), Display()

    def fresh_namespace() -> dict[str, Any]:
        return {"__name__": "__main__", "__builtins__": __builtins__, "spark": spark, "dbutils": dbutils,
                "display": display}

    module_name, attribute = ENTRY_POINTS[name]
    module = importlib.import_module(module_name)
    spy = EntryPointSpy(getattr(module, attribute))
    namespace, printed = fresh_namespace(), io.StringIO()
    run = NotebookRun(namespace, dbutils, display, "", spy)
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, attribute, spy)
        try:
            with contextlib.redirect_stdout(printed):
                for cell in notebook_cells(source, name):
                    if cell.is_magic:
                        run.magic_cells_skipped += 1
                        continue
                    restarts = dbutils.library.restarts
                    # Padded so that a traceback names the notebook's own line numbers.
                    code = compile("\n" * (cell.first_line - 1) + cell.source, str(path), "exec")
                    exec(code, namespace)  # noqa: S102 - running the notebook is the point
                    run.cells_run += 1
                    if dbutils.library.restarts != restarts:
                        # A restarted Python process keeps nothing a cell defined.
                        namespace.clear()
                        namespace.update(fresh_namespace())
        finally:
            run.printed = printed.getvalue()
            run.seconds = time.perf_counter() - started
            sys.stdout.write(run.printed)
            sys.stdout.write(f"\n{name} ran in {run.seconds:.1f} s\n")
    undeclared = dbutils.widgets.undeclared_parameters()
    assert not undeclared, f"{name} has no widgets {sorted(undeclared)}: the job's parameters would be ignored"
    assert dbutils.library.restarts == 1, f"{name} should restart Python once after installing the package"
    return run


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace_mlflow(mlflow_registry, tmp_path_factory):
    """The registry as a configured MLflow environment: ``configure_mlflow`` in a notebook keeps it,
    as it keeps a Databricks workspace's, and the notebooks' experiments keep artifacts here."""
    artifacts = tmp_path_factory.mktemp("notebook_artifacts")
    for experiment in (EXPERIMENT, "dolly_spark"):
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(artifacts / experiment).as_uri())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_registry)
        yield mlflow_registry
    mlflow.set_tracking_uri(mlflow_registry)


@pytest.fixture(scope="module")
def tickets_table(spark) -> str:
    """Five support tickets from the package's sample, as a Delta table."""
    rows = [json.loads(line) for line in PACKAGE_TICKETS.read_text(encoding="utf-8").splitlines()[:5]]
    table = "notebook_support_tickets"
    spark.createDataFrame([(r["ticket_id"], r["subject"], r["body"]) for r in rows],
                          "ticket_id STRING, subject STRING, body STRING") \
        .write.format("delta").mode("overwrite").saveAsTable(table)
    return table


@pytest.fixture(scope="module")
def training_data() -> str:
    """The shared dolly-15k sample."""
    return str(shared_sample())


@pytest.fixture(scope="module")
def parameters(registered_tiny, tickets_table, tiny_model_dir, training_data) -> dict[str, dict[str, str]]:
    """Each notebook's job parameters, pointing at the tiny stand-ins."""
    name, _ = registered_tiny
    return {
        "summarize_tickets.py": {
            "source_table": tickets_table, "target_table": "notebook_ticket_summaries",
            "model_uri": f"models:/{name}@champion", "max_new_tokens": "8", "max_rows": "0",
            "experiment": EXPERIMENT,
        },
        "apply_instruction.py": {
            "source_table": tickets_table, "instruction": "Summarize this ticket in a few words.",
            "input_col": "body", "model_uri": f"models:/{name}@champion", "max_new_tokens": "8", "max_rows": "3",
        },
        "finetune.py": {
            "base_model": str(tiny_model_dir), "train_data": training_data, "model_name": "notebook_dolly",
            "max_steps": "2", "max_eval_records": "4", "experiment": EXPERIMENT,
        },
        "evaluate_and_promote.py": {
            "model_name": "notebook_dolly", "eval_data": training_data, "max_eval_records": "4", "margin": "0.0",
            "experiment": EXPERIMENT,
        },
    }


# --- the notebooks -------------------------------------------------------------------------------

def _rows_by_id(df) -> dict[str, dict]:
    rows = [row.asDict(recursive=True) for row in df.collect()]
    ids = [row["ticket_id"] for row in rows]
    assert len(ids) == len(set(ids)), f"duplicate ticket ids: {ids}"
    return {row["ticket_id"]: row for row in rows}


@pytest.mark.slow
def test_summarize_tickets_merges_one_row_per_ticket_then_a_rerun_writes_nothing(
        spark, workspace_mlflow, registered_tiny, tickets_table, parameters):
    _, version = registered_tiny
    params = parameters["summarize_tickets.py"]
    spark.sql(f"DROP TABLE IF EXISTS {params['target_table']}")

    run = run_notebook("summarize_tickets.py", spark, params)
    report = run.result
    assert run.namespace["report"] is report and run.magic_cells_skipped == 2
    config = run.entry_point.calls[0]["arguments"]["config"]
    assert (config.source_table, config.max_new_tokens, config.experiment) == (tickets_table, 8, EXPERIMENT)

    tickets = _rows_by_id(spark.read.table(tickets_table))
    summaries = _rows_by_id(spark.read.table(params["target_table"]))
    assert sorted(summaries) == sorted(tickets)
    assert {row["model_version"] for row in summaries.values()} == {version}
    assert all(row["error"] is None and row["response"] is not None for row in summaries.values())
    assert all(0 < row["completion_tokens"] <= 8 for row in summaries.values())
    assert (report.rows_pending, report.rows_written, report.errors) == (len(tickets), len(tickets), 0)
    assert report.model_version == version
    # The report, then the preview: one line per ticket with its subject.
    assert str(report) in run.printed
    for ticket_id, ticket in tickets.items():
        assert f"{ticket_id}  {ticket['subject'][:70]}" in run.printed
    logged = MlflowClient().get_run(mlflow.last_active_run().info.run_id)
    assert logged.data.params["source_table"] == tickets_table and logged.data.metrics["rows_written"] == len(tickets)

    rerun = run_notebook("summarize_tickets.py", spark, params).result
    assert (rerun.rows_pending, rerun.rows_written) == (0, 0)
    assert _rows_by_id(spark.read.table(params["target_table"])) == summaries


@pytest.mark.slow
@pytest.mark.parametrize("output_table", ["", "notebook_instruction_results"], ids=["display-only", "saved"])
def test_apply_instruction_displays_a_result_struct_per_row(
        spark, workspace_mlflow, registered_tiny, tickets_table, parameters, output_table):
    name, version = registered_tiny
    params = {**parameters["apply_instruction.py"], "output_table": output_table}
    if output_table:
        spark.sql(f"DROP TABLE IF EXISTS {output_table}")

    run = run_notebook("apply_instruction.py", spark, params)
    arguments = run.entry_point.calls[0]["arguments"]
    assert (arguments["instruction"], arguments["max_new_tokens"]) == (params["instruction"], 8)
    assert len(run.display.shown) == 1
    shown = run.display.shown[0]
    assert shown.columns == spark.read.table(tickets_table).columns + ["result"]
    rows = _rows_by_id(shown)
    assert len(rows) == 3  # max_rows
    for row in rows.values():
        result = row["result"]
        assert (result["model_name"], result["model_version"]) == (name, version)
        assert result["error"] is None and result["finish_reason"] in {"stop", "eos", "length"}
        assert isinstance(result["response"], str) and 0 < result["completion_tokens"] <= 8
    if output_table:
        assert _rows_by_id(spark.read.table(output_table)) == rows
    else:
        assert run.result is shown  # the plan itself: nothing was saved


@pytest.mark.slow
def test_apply_instruction_classifies_and_extracts(spark, workspace_mlflow, registered_tiny, parameters):
    labels = ["billing", "shipping", "technical"]
    params = {**parameters["apply_instruction.py"], "instruction": "Triage this customer support ticket.",
              "choices": ", ".join(labels), "schema": "refund_requested BOOLEAN, urgency STRING",
              "max_new_tokens": "48"}
    run = run_notebook("apply_instruction.py", spark, params)
    arguments = run.entry_point.calls[0]["arguments"]
    assert arguments["choices"] == labels and arguments["schema"] == params["schema"]
    rows = _rows_by_id(run.display.shown[0])
    assert len(rows) == 3
    for row in rows.values():
        result = row["result"]
        assert result["label"] in labels and abs(sum(result["label_probabilities"].values()) - 1) < 1e-6
        document = checked_schema_answer(result, max_new_tokens=48)
        assert document is None or set(document) == {"refund_requested", "urgency"}


@pytest.fixture(scope="module")
def finetuned(spark, workspace_mlflow, tiny_model, parameters):
    """The fine-tune notebook's run on a model whose champion is the untrained tiny model."""
    from dolly_spark.lifecycle.registry import CHAMPION, log_and_register

    params = parameters["finetune.py"]
    model, tokenizer = tiny_model
    champion = log_and_register(model, tokenizer, params["model_name"], "dolly", alias=CHAMPION, max_new_tokens=16)
    return champion, run_notebook("finetune.py", spark, params)


@pytest.mark.slow
def test_finetune_registers_a_challenger(finetuned, parameters, tiny_model_dir, training_data):
    from dolly_spark.lifecycle.registry import CHALLENGER, CHAMPION, alias_version

    champion, run = finetuned
    report = run.result
    params = parameters["finetune.py"]
    assert report.model_name == params["model_name"] and int(report.version) == int(champion) + 1
    assert alias_version(params["model_name"], CHALLENGER) == report.version
    assert alias_version(params["model_name"], CHAMPION) == champion
    assert report.train_records > 0 and report.eval_records > 0
    assert "before_rouge_l" in report.metrics and "after_rouge_l" in report.metrics
    assert str(report) in run.printed
    logged = MlflowClient().get_run(report.run_id)
    assert logged.data.params["max_steps"] == "2" and logged.data.params["max_eval_records"] == "4"
    assert logged.data.params["base_model"] == str(tiny_model_dir)
    assert logged.data.tags["job"] == "finetune"
    assert mlflow.get_experiment(logged.info.experiment_id).name == EXPERIMENT
    assert MlflowClient().get_model_version(params["model_name"], report.version).run_id == report.run_id


@pytest.mark.slow
def test_evaluate_and_promote_moves_champion_only_when_the_challenger_wins(spark, finetuned, parameters):
    from dolly_spark.lifecycle.registry import CHALLENGER, CHAMPION, alias_version, set_alias

    champion, tuning = finetuned
    challenger = tuning.result.version
    params = parameters["evaluate_and_promote.py"]
    name = params["model_name"]
    # The champion goes back where the module registered it, whatever happens: the fine-tune's
    # test checks it, in any order.
    try:
        # No score is above 1: a margin of 2 cannot be met.
        kept = run_notebook("evaluate_and_promote.py", spark, {**params, "margin": "2"})
        report = kept.result
        assert str(report) in kept.printed and "promoted=False" in kept.printed
        assert (report.challenger_version, report.champion_version, report.promoted) == (challenger, champion, False)
        assert report.champion_score is not None and report.metrics["promoted"] == 0.0
        assert alias_version(name, CHAMPION) == champion and alias_version(name, CHALLENGER) == challenger
        assert kept.entry_point.calls[0]["arguments"]["config"].max_eval_records == 4

        # Any challenger beats its champion by a margin of -1.
        moved = run_notebook("evaluate_and_promote.py", spark, {**params, "margin": "-1"})
        report = moved.result
        assert str(report) in moved.printed and "promoted=True" in moved.printed
        assert (report.challenger_version, report.champion_version, report.promoted) == (challenger, champion, True)
        assert alias_version(name, CHAMPION) == challenger
        run = MlflowClient().get_run(report.run_id)
        assert run.data.params["margin"] == "-1.0" and run.data.tags["champion_version"] == champion
    finally:
        set_alias(name, CHAMPION, champion)


def test_every_notebook_has_an_entry_point_and_runs_here():
    assert {path.name for path in NOTEBOOK_DIR.glob("*.py")} == set(ENTRY_POINTS)
