"""Eval-gated model registration in the MLflow model registry: a new version always, the alias only if it wins.

:func:`register_model` logs an exported model directory to a run, creates a registered-model version from it,
records the primary metric on the version as a tag (``m2d2.metric.<name>``; the full set stays on the run and in
the version's description), and compares the primary metric
with the version that holds the alias (``champion``). The alias moves only when the new version is strictly
better; the very first version takes it. Either way the version carries ``m2d2.promotion`` (``promoted`` /
``not_promoted``) and ``m2d2.promotion_reason``, so the registry itself says why a version is or is not serving.

Metrics are compared only with the incumbent's own tag, never recomputed, and only when both versions were
evaluated on the same suite: a version records the digest of its evaluation (``m2d2.eval_suite``: protocol, prompt
and evaluation data), and one evaluated on another suite is registered but not compared — the alias stays, and the
version says why. An incumbent without the primary metric's tag is an error, not a silent promotion. Registry
stages are deprecated since MLflow 2.9; aliases are the supported mechanism.

Reading the incumbent and moving the alias are two requests, not a transaction: run the registrations of one
model name one at a time (one Flyte task per pipeline execution does). Uses ``MlflowClient`` with explicit
ids, like :mod:`m2d2.tracking`; the registry needs a database backend (SQLite or a server), not a file store.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from m2d2 import io, tracking
from m2d2.redaction import redact_url

__all__ = ["RegistrationResult", "metric_tag", "register_model"]

ARTIFACT_PATH = "model"
METRIC_TAG_PREFIX = "m2d2.metric."
PRIMARY_TAG = "m2d2.primary_metric"
DIRECTION_TAG = "m2d2.higher_is_better"
STATUS_TAG = "m2d2.promotion"
REASON_TAG = "m2d2.promotion_reason"
EXPORT_TAG = "m2d2.export_uri"
SUITE_TAG = "m2d2.eval_suite"  # digest of the evaluation a version's metrics come from
MODEL_CARD = "README.md"  # an export's model card (Hugging Face layout), carried into the registered model
EXPORT_MARKER = "config.json"  # written last by M2D2.save_pretrained: its presence marks a complete export
_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


@dataclass(frozen=True)
class RegistrationResult:
    """What :func:`register_model` did: the new version, whether it took the alias, and why."""

    name: str
    version: str
    run_id: str
    model_uri: str  # models:/<name>/<version>
    alias: str
    promoted: bool
    reason: str
    primary_metric: str
    value: float
    incumbent_version: str | None
    incumbent_value: float | None


def metric_tag(metric: str) -> str:
    """Version-tag key of a metric; characters MLflow rejects in keys (``@`` of ``R@1``) are dropped."""
    return METRIC_TAG_PREFIX + _TAG_UNSAFE.sub("", metric)


def _is_missing(err: MlflowException) -> bool:
    """No such registered model, or no version holds the alias (MLflow reports the latter as a bad parameter)."""
    if err.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(err.message)


def _incumbent(client, name: str, alias: str, primary_metric: str,
               suite: str | None) -> tuple[str | None, float | None, str | None]:
    """The version holding ``alias``, its recorded primary metric and its evaluation suite's digest, or
    (None, None, None) when nobody holds it. A holder evaluated on another suite comes without its metric: it
    cannot be compared, whatever it recorded."""
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if _is_missing(err):
            return None, None, None
        raise
    theirs = current.tags.get(SUITE_TAG)
    if theirs != suite:
        return str(current.version), None, theirs
    raw = current.tags.get(metric_tag(primary_metric))
    if raw is None:
        raise ValueError(f"{name} v{current.version} holds alias {alias!r} but has no tag "
                         f"{metric_tag(primary_metric)!r}; it was not registered with {primary_metric!r} and cannot "
                         "be compared. Move the alias by hand or pick a primary metric it has")
    return str(current.version), float(raw), theirs


def _decide(value: float, incumbent: float | None, incumbent_version: str | None, metric: str,
            higher_is_better: bool, alias: str, suite: str | None = None,
            incumbent_suite: str | None = None) -> tuple[bool, str]:
    if incumbent_version is None:
        return True, f"first version for alias {alias!r}: no version held it"
    if incumbent is None:  # held, but by a version evaluated on another suite
        return False, (f"not compared: v{incumbent_version} (alias {alias!r}) was evaluated on suite "
                       f"{(incumbent_suite or 'unrecorded')[:12]}, this version on {(suite or 'unrecorded')[:12]}; "
                       "registered without moving the alias (evaluate both on one suite, or move it by hand)")
    better = value > incumbent if higher_is_better else value < incumbent
    word = "higher" if higher_is_better else "lower"
    if better:
        return True, f"{metric}={value:.6g} beats v{incumbent_version} ({incumbent:.6g}; {word} is better)"
    relation = "ties" if value == incumbent else "does not beat"
    return False, (f"{metric}={value:.6g} {relation} v{incumbent_version} ({incumbent:.6g}; {word} is better, "
                   "a tie keeps the incumbent)")


def _ensure_registered_model(client, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_model(
    export_dir: str | Path,
    name: str,
    metrics: Mapping[str, float],
    primary_metric: str,
    higher_is_better: bool = True,
    alias: str = "champion",
    run_id: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    version_tags: Mapping[str, str] | None = None,
    suite: str | None = None,
    description: str = "",
) -> RegistrationResult:
    """Register ``export_dir`` (an ``M2D2.save_pretrained`` directory, local or ``s3://``) as a new version of
    ``name`` and give it ``alias`` only if ``metrics[primary_metric]`` strictly beats the alias holder's.

    The directory is logged under ``model/`` of ``run_id`` (e.g. the evaluation run) or, without one, of a new
    run in ``experiment`` that also records ``metrics``. ``version_tags`` go onto the version besides the metric tags
    (the pipeline names the model variant there). ``suite`` is the digest of the evaluation the metrics come from
    (:func:`m2d2.eval.clap.suite_digest`): the alias holder is compared only if it was evaluated on the same one.
    ``description`` (markdown) becomes the version's description, followed by the promotion decision and its
    reason. The logged model is an MLflow pyfunc (:mod:`m2d2.serving`) whose artifact ``export`` is the export.
    Every check (metric present and finite, alias valid, export complete, incumbent comparable) happens before
    anything is written.
    """
    if not name:
        raise ValueError("a registered model needs a name")
    if not _ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"invalid alias {alias!r}: letters, digits, '_' and '-' only; not 'latest' or 'v<N>'")
    if primary_metric not in metrics:
        raise ValueError(f"primary metric {primary_metric!r} is not among the metrics: {sorted(metrics)}")
    value = float(metrics[primary_metric])
    if not math.isfinite(value):
        raise ValueError(f"primary metric {primary_metric}={value} is not finite; it cannot rank versions")
    export = str(io.local_path(export_dir).resolve()) if io.is_local(export_dir) else str(export_dir)
    if not io.exists(io.join(export, EXPORT_MARKER)):
        raise FileNotFoundError(f"{export}: no {EXPORT_MARKER}; not a complete M2D2 export")

    client = tracking.client()
    incumbent_version, incumbent_value, incumbent_suite = _incumbent(client, name, alias, primary_metric, suite)

    from m2d2.models.model import EXPORT_FILES
    from m2d2.serving import save_pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        local = io.local_path(export) if io.is_local(export) else io.download_dir(export, tmp, EXPORT_FILES)
        if not io.is_local(export) and io.exists(io.join(export, MODEL_CARD)):  # the card travels with the weights
            (Path(local) / MODEL_CARD).write_bytes(io.read_bytes(io.join(export, MODEL_CARD)))
        # an MLflow model (pyfunc, defined by code) holding the export as its artifact: load_model and serve work
        model_dir = save_pyfunc(local, Path(tmp) / "mlflow-model")
        if run_id is None:
            experiment_id = tracking.experiment_id(client, experiment)
            run = client.create_run(experiment_id, run_name=f"register-{name}",
                                    tags={tracking.KIND_TAG: "register", EXPORT_TAG: redact_url(export)})
            run_id = run.info.run_id
            try:
                client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)
                for key, metric in metrics.items():
                    client.log_metric(run_id, _TAG_UNSAFE.sub("", key), float(metric), step=0)
            except BaseException:
                client.set_terminated(run_id, "FAILED")
                raise
            client.set_terminated(run_id, "FINISHED")
        else:
            client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)

    # A handful of tags: what the registry compares (the primary metric) and what identifies the version; the full
    # metric set stays on the run, and the description says it in words.
    tags = {metric_tag(primary_metric): repr(value)}
    tags.update({k: str(v) for k, v in (version_tags or {}).items()})
    tags.update({PRIMARY_TAG: primary_metric, DIRECTION_TAG: str(higher_is_better).lower(),
                 EXPORT_TAG: redact_url(export)})
    if suite is not None:
        tags[SUITE_TAG] = suite
    _ensure_registered_model(client, name)
    version = str(client.create_model_version(name, f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id,
                                              tags=tags).version)

    promoted, reason = _decide(value, incumbent_value, incumbent_version, primary_metric, higher_is_better, alias,
                               suite, incumbent_suite)
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, STATUS_TAG, "promoted" if promoted else "not_promoted")
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    decision = f"**{'Promoted' if promoted else 'Not promoted'}** to `{alias}`: {reason}."
    client.update_model_version(name, version, description=f"{description.rstrip()}\n\n{decision}".strip())
    return RegistrationResult(name, version, run_id, f"models:/{name}/{version}", alias, promoted, reason,
                              primary_metric, value, incumbent_version, incumbent_value)
