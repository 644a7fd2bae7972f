"""The commands of the README and the docs pages, typed as a user types them, in a shell with the
venv activated, from a clean project home on the embedded default (local Spark and Delta, the
local MLflow registry)."""
from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import shared_sample
from project_home import (REPO, background_command, home_registry, quiet_start_problems, read_delta, run_command,
                          spark_log_lines)
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17+ on PATH")


def readme_commands() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def docs_page(name: str) -> str:
    """The text of a page of the docs site (``docs/<name>``)."""
    return (REPO / "docs" / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def home(seeded_home) -> Path:
    return seeded_home


def succeeded(result) -> str:
    """The output of a command that exited 0 and started quietly: no Ivy resolution report, and
    nothing from Spark's console log (no WARN, start-up notes included, and no ERROR)."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    problems = quiet_start_problems(output) + spark_log_lines(output, "ERROR")
    assert not problems, "\n".join(problems) + "\n...\n" + output[-4000:]
    return output


QUICK_DEMO = 'make demo ARGS="--max-rows 8"'


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """(home, process, log) of the README's quick `make demo`, from a clean project home, started
    in the background when first asked for: it runs beside the job commands, in a home (Derby
    metastore, MLflow registry, warehouse) of its own. A command's JVM start, imports and Delta
    commits are mostly one core's work, so side by side the two tests took 206 s here against
    240 s one after the other. Killed at the end of the module if still running."""
    home = tmp_path_factory.mktemp("quick_demo") / "home"
    log = home.parent / "make_demo.log"
    with background_command(QUICK_DEMO, home, log) as process:
        yield home, process, log


@pytest.mark.slow
@needs_java
def test_readme_job_commands_run_verbatim_on_the_embedded_default(spark, home, quick_demo):
    readme, jobs_page = readme_commands(), docs_page("jobs.md")
    summarize = "spark-submit jobs/summarize_tickets.py --config conf/summarize_tickets.yaml"
    # The dry run first, with the console script: it counts what the run after it does, and
    # writes no table.
    dry_run = "dolly-spark summarize --config conf/summarize_tickets.yaml --dry-run"
    assert dry_run in jobs_page
    # Answers of up to 32 tokens, not the config's 96, in the dry run's calibration and the run:
    # the tiny model fills whatever it is given, and nothing checked here depends on the length.
    short_answers = " --max-new-tokens 32"
    output = succeeded(run_command(dry_run + short_answers, home))
    assert "starting a local Spark session (local[*])" in output
    assert re.search(r"^pending tickets +40 \(40 new\)$", output, re.M), output[-3000:]
    # Calibrated: this home's MLflow holds no run of the same request answered by the same engine
    # on the same kind of task slot (the cluster test's run there asked for answers of another
    # length, another request). All 40 tickets: less than a full micro-batch per task slot.
    assert re.search(r"^rate from +a calibration of 40 tickets \(", output, re.M), output[-3000:]
    assert re.search(r"^model, engine +support_dolly v1, engine hf, on ", output, re.M), output[-3000:]
    counted_prompt_tokens = int(re.search(r"^prompt tokens +(\d+) ", output, re.M)[1])
    assert not (home / "warehouse" / "ticket_summaries").exists()

    assert f"source .venv/bin/activate\n{summarize}" in readme
    assert f"source .venv/bin/activate\n{summarize}" in jobs_page
    output = succeeded(run_command(summarize + short_answers, home))
    assert "40 tickets summarized with support_dolly v1" in output
    assert "using the Spark master local[*] from spark-submit" in output
    rows = read_delta(spark, home, "ticket_summaries").select("ticket_id", "prompt_tokens").collect()
    assert len(rows) == len({row["ticket_id"] for row in rows}) == 40
    assert sum(row["prompt_tokens"] for row in rows) == counted_prompt_tokens
    # The staging tables of a finished run are gone (its released claim's table stays).
    assert [path.name for path in (home / "warehouse").glob("ticket_summaries__*")] == ["ticket_summaries__claim"]

    # The same job with structured answers (`spark-submit ... --config conf/triage_tickets.yaml`,
    # on jobs.md) is not run again here: its script is the one just run, and its config asks what
    # the demo's triage asks (instruction, labels, schema: tests/spark/test_structured_udf.py),
    # which `make demo` runs beside these commands.

    # The demo fine-tune: from version 1 (here the tiny model), on the dolly sample beside the
    # project, scored against its base on a held-out quarter of each category. (The fine-tune
    # command with conf/finetune.yaml runs in tests/training/test_distributed_finetune.py.)
    finetune_demo = "spark-submit jobs/finetune.py --config conf/finetune_demo.yaml"
    assert finetune_demo in docs_page("fine-tuning.md")
    output = succeeded(run_command(f"{finetune_demo} --max-steps 2 --max-eval-records 4 --eval-max-new-tokens 8", home))
    assert "registered support_dolly version 2 as @challenger" in output, output[-2000:]
    assert re.search(r"ROUGE-L gain over the base in its own format: \S+ \(95% bootstrap interval", output), output[-2000:]

    evaluate = "spark-submit jobs/evaluate_and_promote.py --config conf/evaluate_and_promote.yaml"
    assert evaluate in jobs_page
    output = succeeded(run_command(f"{evaluate} --eval-data {shared_sample()} --max-eval-records 4 --max-new-tokens 8",
                                   home))
    outcome = re.search(r"challenger v2 rouge_l=\S+, champion v1 rouge_l=\S+, base rouge_l=\S+: (promoted|not promoted)",
                        output)
    assert outcome, output[-2000:]

    # The champion that follows from the evaluation's outcome, in the home's registry.
    champion = home_registry(home).get_model_version_by_alias("support_dolly", "champion")
    assert int(champion.version) == (2 if outcome[1] == "promoted" else 1), outcome[0]


@pytest.mark.slow
@needs_java
def test_make_demo_from_a_clean_project_home(spark, quick_demo):
    assert QUICK_DEMO in readme_commands() and QUICK_DEMO in docs_page("getting-started.md")
    home, process, log = quick_demo
    # The first 8 of the 40 sample tickets, through the whole demo (conversion, registration, both
    # jobs, previews): the same path as `make demo`, about 70 s sooner here.
    assert process.wait(timeout=1200) == 0, log.read_text()[-4000:]
    output = log.read_text()
    # Neither Ivy's report nor any line of Spark's console log (no WARN: the session bound to the
    # loopback address itself; no internal warning of an ordinary run, whose capped run rewrites
    # its staging table; no error).
    problems = quiet_start_problems(output) + spark_log_lines(output, "ERROR")
    assert not problems, "\n".join(problems) + "\n...\n" + output[-3000:]
    assert re.search(r"^8 tickets summarized with support_dolly v1 .*; 32 more left pending", output, re.M), output[-3000:]
    assert "ticket_summaries (first rows):" in output
    assert read_delta(spark, home, "ticket_summaries").count() == 8
    # The triage beside the summaries: labels with their probability, extracted fields, accuracy.
    assert re.search(r"^8 tickets triaged with support_dolly v1 .*; 32 more left pending", output, re.M), output[-3000:]
    assert re.search(r"T-1001  Charged twice for January invoice\n    -> \w[\w ]* \(\d\.\d\d\)", output), output[-3000:]
    assert re.search(r"labels matching the sample tickets' hand-written ones: \d+ of 8$", output, re.M)
    triaged = read_delta(spark, home, "ticket_triage")
    assert triaged.count() == 8 and triaged.where("parsed IS NOT NULL").count() > 0
    # urgency is an enum in the triage schema: the demo model writes one of its values, nothing else.
    urgencies = {row["urgency"] for row in triaged.where("parsed IS NOT NULL").select("parsed.urgency").collect()}
    assert urgencies and urgencies <= {"low", "medium", "high"}, urgencies


@pytest.mark.slow
@needs_java
def test_spark_submit_without_delta_says_which_package_to_add(home, tmp_path):
    from dolly_spark.spark.delta_jars import delta_package

    empty_conf = tmp_path / "conf"
    empty_conf.mkdir()
    result = run_command("spark-submit jobs/summarize_tickets.py --config conf/summarize_tickets.yaml", home,
                         SPARK_CONF_DIR=str(empty_conf))
    assert result.returncode != 0
    assert f"spark-submit --packages {delta_package()}" in result.stdout + result.stderr
    assert "Run `dolly-spark setup-spark`" in result.stdout + result.stderr


def test_setup_spark_writes_delta_into_spark_defaults(tmp_path):
    from dolly_spark.spark.delta_jars import delta_excludes, delta_jars_dir, delta_package, local_delta_jars
    from dolly_spark.spark.spark_conf import read_defaults
    from dolly_spark.spark.spark_env import LOOPBACK_BLOCK

    conf = tmp_path / "conf"
    conf.mkdir()
    # The user's own setting, and the lines an earlier version of the package wrote: Delta resolved
    # by Ivy at every start.
    (conf / "spark-defaults.conf").write_text(
        "spark.executor.memory 3g\n# dolly-spark setup-spark: Delta Lake for jobs started with spark-submit\n"
        f"spark.jars.packages {delta_package()}\nspark.jars.excludes {delta_excludes()}\n")
    (conf / "spark-env.sh").write_text("SPARK_WORKER_CORES=2\n")
    for _ in range(2):  # a second run changes nothing
        result = run_command("dolly-spark setup-spark", tmp_path / "home", SPARK_CONF_DIR=str(conf))
        assert result.returncode == 0, result.stderr
    settings = read_defaults(conf / "spark-defaults.conf")
    jars = local_delta_jars()  # resolved at install, in the venv's Spark conf
    assert jars and {jar.parent for jar in jars} == {delta_jars_dir()}
    assert any(jar.name.startswith("io.delta_delta-spark_") for jar in jars), jars
    assert settings == {
        "spark.executor.memory": "3g",
        "spark.jars": ",".join(str(jar) for jar in jars),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    }
    assert (conf / "spark-defaults.conf").read_text().count("# dolly-spark setup-spark") == 1
    assert (conf / "spark-env.sh").read_text() == "SPARK_WORKER_CORES=2\n" + LOOPBACK_BLOCK
    assert "rootLogger.level = warn" in (conf / "log4j2.properties").read_text()


def test_delta_package_is_the_one_delta_pip_asks_for():
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    from dolly_spark.spark.delta_jars import delta_package

    builder = configure_spark_with_delta_pip(SparkSession.Builder())
    assert builder._options["spark.jars.packages"] == delta_package()


def test_delta_artifacts_left_out_are_the_ones_spark_ships():
    """Each artifact resolved without is one Spark's own jars directory holds, so leaving it out
    changes no class a job loads."""
    from pyspark.find_spark_home import _find_spark_home

    from dolly_spark.spark.delta_jars import DELTA_EXCLUDES

    spark_jars = [path.name for path in (Path(_find_spark_home()) / "jars").glob("*.jar")]
    missing = [coordinate for coordinate in DELTA_EXCLUDES
               if not any(re.fullmatch(rf"{re.escape(coordinate.split(':')[1])}-\d[\w.-]*\.jar", jar) for jar in spark_jars)]
    assert not missing, f"Spark ships no jar of {missing}: Delta needs them resolved"


def test_wheel_keeps_spark_and_delta_in_the_local_extra(tmp_path):
    result = run_command(f"pip wheel --quiet --no-deps --no-build-isolation -w {tmp_path} .", tmp_path / "home")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("dolly_spark-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        requires = [line.removeprefix("Requires-Dist: ") for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist: ")]
    spark_lines = [line for line in requires if re.match(r"(pyspark|delta-spark|delta_spark)\b", line)]
    assert len(spark_lines) == 2, requires
    assert all('extra == "local"' in line for line in spark_lines), spark_lines
    assert any(line.startswith("mlflow") and "extra" not in line for line in requires), requires
    assert not any("+" in line for line in requires)


PROBE = """
from dolly_spark.spark.sessions import get_spark
spark = get_spark("probe")
conf = spark.sparkContext.getConf()
for key in ("spark.master", "spark.app.name", "spark.sql.shuffle.partitions", "spark.sql.execution.arrow.pyspark.enabled",
            "spark.sql.extensions", "spark.sql.catalogImplementation"):
    print(f"probe {key}={conf.get(key)}")
print("probe tables=" + ",".join(t.name for t in spark.catalog.listTables()))
"""


@pytest.mark.slow
@needs_java
def test_spark_submit_settings_win_and_only_missing_ones_are_added(home, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = run_command(f"spark-submit --master local[2] --conf spark.sql.shuffle.partitions=3 {script}", home,
                         DOLLY_SPARK_MASTER="local[1]")
    settings = dict(line.removeprefix("probe ").split("=", 1) for line in succeeded(result).splitlines()
                    if line.startswith("probe "))
    assert settings["spark.master"] == "local[2]"  # not $DOLLY_SPARK_MASTER: that is for sessions we start
    assert settings["spark.app.name"] == "probe.py"
    assert settings["spark.sql.shuffle.partitions"] == "3"
    assert settings["spark.sql.execution.arrow.pyspark.enabled"] == "true"
    assert settings["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert settings["spark.sql.catalogImplementation"] == "hive"
    assert "support_tickets" in settings["tables"].split(",")  # the embedded catalog under the project home
