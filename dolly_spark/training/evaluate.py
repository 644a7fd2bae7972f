"""The evaluate-and-promote job: score the challenger, the champion and the challenger's base on
the same held-out records, each in the prompt format it answers best in and with the repetition
control registered with it (as the jobs generate with it), and move ``champion``
to the challenger only when it beats both by the configured margin.

The base matters when there is no champion yet (or the champion is older than the base): a
fine-tune that made the model worse than what it started from is never promoted."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dolly_spark.lifecycle.registry import CHALLENGER, CHAMPION, alias_version, set_alias
from dolly_spark.training.base_model import load_base_model
from dolly_spark.training.configs import EvaluateConfig
from dolly_spark.training.data import load_records, stratified_split, validate_records
from dolly_spark.training.model_scoring import category_chart, flat_metrics, score_model

log = logging.getLogger(__name__)


@dataclass
class PromotionReport:
    run_id: str
    challenger_version: str
    champion_version: str | None
    challenger_score: float
    champion_score: float | None
    promoted: bool
    metrics: dict[str, float] = field(default_factory=dict)
    base_score: float | None = None


def held_out_records(config: EvaluateConfig, spark: Any = None, trained_on: dict[str, Any] | None = None
                     ) -> list[dict[str, str]]:
    """The records the fine-tune held out: the same data, fraction and seed give the same split.
    When ``eval_data`` is the Delta table the challenger was trained on (``trained_on``: its
    model metadata), the version it was trained on is read, so rows appended since cannot
    reshuffle training records into the held-out set."""
    trained_on = trained_on or {}
    version = None
    if trained_on.get("train_data") == config.eval_data and str(trained_on.get("train_data_version", "")).isdigit():
        version = int(trained_on["train_data_version"])
    records, source = load_records(config.eval_data, spark, delta_version_as_of=version)
    if trained_on.get("train_data") == source.name and trained_on.get("train_data_version") != source.version:
        log.warning("%s changed since the challenger was trained on it (version %s, now %s): the held-out "
                    "split may include training records", source.name, trained_on.get("train_data_version"),
                    source.version)
    kept = validate_records(records).kept
    if config.eval_fraction >= 1.0:
        return kept[: config.max_eval_records]
    return stratified_split(kept, config.eval_fraction, config.seed)[1][: config.max_eval_records]


def _evaluate_version(name: str, version: str, records, config: EvaluateConfig) -> dict[str, Any]:
    registered = load_base_model(f"models:/{name}/{version}")
    return score_model(registered.model, registered.tokenizer, records, registered.registered_format or "dolly",
                       config.max_new_tokens, config.max_length, registered.repetition)


def _evaluate_base(metadata: dict[str, Any], records, config: EvaluateConfig) -> dict[str, Any] | None:
    """The challenger's base, as it was before the fine-tune, in its own format; None when the
    version records no base or the base cannot be loaded here (said in the log)."""
    base_uri = metadata.get("base_model_uri")
    if not base_uri:
        log.info("the challenger records no base model (base_model_uri): compared with the champion only")
        return None
    try:
        base = load_base_model(base_uri)
    except (OSError, ValueError) as exc:
        log.warning("the challenger's base %s cannot be loaded (%s): compared with the champion only", base_uri, exc)
        return None
    return score_model(base.model, base.tokenizer, records, base.own_format, config.max_new_tokens, config.max_length,
                       base.repetition)


def run_evaluate_and_promote(config: EvaluateConfig, spark: Any = None) -> PromotionReport:
    """Evaluate ``@challenger`` (and ``@champion`` when there is one) and promote on a win."""
    challenger = alias_version(config.model_name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"registered model {config.model_name!r} has no @{CHALLENGER} alias; run the fine-tune job first")
    champion = alias_version(config.model_name, CHAMPION)
    metadata = mlflow.models.get_model_info(f"models:/{config.model_name}/{challenger}").metadata or {}
    records = held_out_records(config, spark, trained_on=metadata)
    if not records:
        raise ValueError(f"no held-out records in {config.eval_data!r} with eval_fraction={config.eval_fraction}")

    with mlflow.start_run(run_name=f"evaluate-{config.model_name}-v{challenger}") as run:
        mlflow.set_tags({"job": "evaluate_and_promote", "challenger_version": challenger,
                         "champion_version": champion or "none"})
        mlflow.log_params({**asdict(config), "eval_records": len(records)})
        evaluations = {f"challenger v{challenger}": _evaluate_version(config.model_name, challenger, records, config)}
        metrics = flat_metrics("challenger", evaluations[f"challenger v{challenger}"])
        challenger_score = metrics[f"challenger_{config.metric}"]
        champion_score = base_score = None
        if champion is not None and champion != challenger:
            evaluations[f"champion v{champion}"] = _evaluate_version(config.model_name, champion, records, config)
            metrics.update(flat_metrics("champion", evaluations[f"champion v{champion}"]))
            champion_score = metrics[f"champion_{config.metric}"]
        base = _evaluate_base(metadata, records, config)
        if base is not None:
            evaluations[f"base ({base['prompt_format']})"] = base
            metrics.update(flat_metrics("base", base))
            base_score = metrics[f"base_{config.metric}"]
            mlflow.set_tag("base_prompt_format", base["prompt_format"])
        # The challenger must beat every model it could replace or came from.
        references = [score for score in (champion_score, base_score) if score is not None]
        promoted = all(challenger_score >= score + config.margin for score in references)
        metrics["promoted"] = float(promoted)
        mlflow.log_metrics(metrics)
        mlflow.log_figure(category_chart(evaluations), "rouge_l_by_category.png")
        client = MlflowClient()
        client.set_model_version_tag(config.model_name, challenger, f"eval_{config.metric}", f"{challenger_score:.4f}")
        if promoted:
            set_alias(config.model_name, CHAMPION, challenger)
        log.info("challenger v%s %s=%.4f vs champion %s %s, base %s: %s", challenger, config.metric, challenger_score,
                 f"v{champion}" if champion else "none",
                 f"{champion_score:.4f}" if champion_score is not None else "-",
                 f"{base_score:.4f}" if base_score is not None else "-",
                 "promoted to champion" if promoted else "not promoted")
        return PromotionReport(run.info.run_id, challenger, champion, challenger_score, champion_score, promoted,
                               metrics, base_score)
