"""Launch plans for the cluster: the paper run on demand, and a scheduled retraining on the newest data snapshot.

Register with the trainer topology and images, e.g.::

    M2D2_TOPOLOGY=paper M2D2_DATA_ROOT=/data/m2d2/runs M2D2_SNAPSHOTS=s3://my-bucket/corpus \\
    M2D2_NOTIFY_EMAIL=ml-team@example.com \\
    pyflyte register workflows --image trainer=<registry>/m2d2-trainer:<v> --image cpu=<registry>/m2d2-cpu:<v>

Everything here is read when the module is imported (registration), since Flyte stores launch plans as data:
``M2D2_DATA_ROOT`` (where every step writes), ``M2D2_SNAPSHOTS`` (a prefix of dated corpus snapshots, each a
directory with ``manifest.parquet``; the scheduled run trains on the newest), ``M2D2_RETRAIN_CRON`` (default
Sundays 03:00 UTC), ``M2D2_NOTIFY_EMAIL`` / ``M2D2_NOTIFY_SLACK`` (comma-separated recipients of failure and
success notices; none when unset), ``M2D2_REMOTE_CODE_SHA256`` (the digest of NV-Embed-v2's code files that you
reviewed, printed by ``python -c "from m2d2.text.encoders import remote_code_digest as d; print(d('/models/NV-Embed-v2'))"``).

The paper recipe embeds captions with NV-Embed-v2, which ships its model as Python code in its directory. These
launch plans are where the project turns that code on (``trust_remote_code=True``), and only for the files whose
digest you pinned: without ``M2D2_REMOTE_CODE_SHA256`` the caption step refuses to run them and prints the digest
it found.
"""

from __future__ import annotations

import dataclasses
import os

from flytekit import CronSchedule, Email, LaunchPlan, Slack, WorkflowExecutionPhase

from m2d2.pipeline import LATEST, PipelineConfig
from m2d2.presets import pipeline_config
from workflows.full import full

DATA_ROOT = os.environ.get("M2D2_DATA_ROOT", "/data/m2d2/runs")  # the shared volume of the PodTemplates
SNAPSHOTS = os.environ.get("M2D2_SNAPSHOTS", "s3://m2d2/corpus")
RETRAIN_CRON = os.environ.get("M2D2_RETRAIN_CRON", "0 3 * * 0")


def _recipients(name: str) -> list[str]:
    return [r.strip() for r in os.environ.get(name, "").split(",") if r.strip()]


def notifications() -> list:
    """Failure and success notices to the configured recipients (Flyte's notification config must be enabled)."""
    phases = [WorkflowExecutionPhase.FAILED, WorkflowExecutionPhase.TIMED_OUT, WorkflowExecutionPhase.SUCCEEDED]
    out: list = []
    if emails := _recipients("M2D2_NOTIFY_EMAIL"):
        out.append(Email(phases=phases, recipients_email=emails))
    if slack := _recipients("M2D2_NOTIFY_SLACK"):
        out.append(Slack(phases=phases, recipients_email=slack))
    return out


REMOTE_CODE_SHA256 = os.environ.get("M2D2_REMOTE_CODE_SHA256", "")


def paper_config(**changes) -> PipelineConfig:
    cfg = pipeline_config("paper", data_root=DATA_ROOT, corpus_source=f"{SNAPSHOTS}/{LATEST}",
                          trust_remote_code=True, remote_code_sha256=REMOTE_CODE_SHA256)
    return dataclasses.replace(cfg, **changes)


#: The published recipe, launched by hand: `pyflyte run --remote ... --launch-plan m2d2_full_paper` or the console.
full_paper = LaunchPlan.get_or_create(
    workflow=full, name="m2d2_full_paper", default_inputs={"cfg": paper_config()}, notifications=notifications(),
)

#: Scheduled retraining: every RETRAIN_CRON, the paper recipe on the newest snapshot under M2D2_SNAPSHOTS.
#: ``run_key`` stays empty, so checkpoints are keyed by the resolved inputs: a new snapshot trains anew, and a
#: retried execution resumes its own checkpoints.
retrain_weekly = LaunchPlan.get_or_create(
    workflow=full, name="m2d2_retrain_scheduled", default_inputs={"cfg": paper_config(experiment="m2d2-retrain")},
    schedule=CronSchedule(schedule=RETRAIN_CRON), notifications=notifications(), auto_activate=True,
)
