"""MLflow tracking for a staged pipeline: one parent run per pipeline execution, one child run per stage.

Everything goes through ``mlflow.MlflowClient`` with explicit run ids, never the fluent ``mlflow.start_run`` stack.
The fluent API keeps the active run in process-global state, but our stages run in separate processes (and pods),
so the parent run id travels as a plain string between tasks and each stage attaches to it through the
``mlflow.parentRunId`` tag, which is what the MLflow UI uses to nest runs. ``start_run(parent_run_id=...)`` would
also require the parent to be active in the same process.

Training stages are multi-process: only the main rank (``RANK`` unset or ``"0"``) creates a run and logs; on
every other rank :class:`StageRun` is an inert object, so training code calls it unconditionally.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (set per task, per ``pyflyte run --env`` or cluster-wide);
without it runs go to ``sqlite:///mlflow.db`` in the current directory. This module never imports flytekit.

Every param, tag and logged dict passes through :func:`m2d2.redaction.redact` first: a config or the environment
may hold a URL with credentials (``http://user:pass@host``), and anyone who can read the experiment would see it.
For the same reason MLflow's own "View run ... at <link>" line, built from the raw tracking URI, is suppressed when
that URI carries credentials.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException

from m2d2.redaction import redact, redact_url

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "m2d2"

EXECUTION_TAG = "flyte.execution_id"
KIND_TAG = "m2d2.kind"
STAGE_TAG = "m2d2.stage"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI to pick the experiment's view
MODEL_TRAINING = "custom_model_development"  # the UI's model-training view (runs table, charts), not GenAI
UI_MODEL_TRAINING = "workflowType=machine_learning"  # the UI link parameter that opens that view (MLflow >= 3.17)

# MLflow server-side limits (mlflow.utils.validation); exceeding them makes the whole request fail.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TRUNCATION_NOTE = "...[truncated]"
# MLflow prints "View run ... at <link>" on set_terminated unless this is set (it reads it at each call).
_SUPPRESS_LINK = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"

_T = TypeVar("_T")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set (and non-empty), else a SQLite file in the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_main_process() -> bool:
    """True on the rank that logs: ``RANK`` unset (single process) or ``"0"``."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def client() -> MlflowClient:
    """A client bound to :func:`tracking_uri` at call time, so a changed environment is always honoured."""
    return MlflowClient(tracking_uri=tracking_uri())


def _now_ms() -> int:
    return int(time.time() * 1000)


def _quote(value: str) -> str:
    """A string literal for an MLflow search filter (its parser has no escapes: pick the quote not in ``value``)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for a value with both quote characters: {value!r}")


def _clean(value: Any, limit: int, key: str) -> str:
    """A param or tag value as MLflow stores it: stringified, credentials masked, then cut to ``limit``."""
    return _truncate(redact_url(str(value)), limit, key)


def _truncate(value: str, limit: int, key: str) -> str:
    if len(value) <= limit:
        return value
    log.warning("MLflow value for %r has %d chars; truncated to %d", key, len(value), limit)
    return value[: limit - len(TRUNCATION_NOTE)] + TRUNCATION_NOTE


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _is_record(obj: Any) -> bool:
    return isinstance(obj, Mapping) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) mapping or dataclass as one level of dotted keys (``encoder.depth``); leaves kept as they are."""
    if not _is_record(obj):
        raise TypeError(f"expected a mapping or dataclass instance, got {type(obj).__name__}")
    if not isinstance(obj, Mapping):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if _is_record(value) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return redact(dataclasses.asdict(obj))
    return redact_url(str(obj))


def _tags(tags: Mapping[str, Any] | None) -> list[RunTag]:
    return [RunTag(str(k), _clean(v, MAX_TAG_VALUE, str(k))) for k, v in (tags or {}).items()]


def experiment_id(mlflow: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed, declared a model-training experiment.

    MLflow 3 reads the ``mlflow.experimentKind`` tag to tell GenAI experiments (traces, judges) from model-training
    ones; ours train models, so the tag says so. An experiment made before this (or by hand) gets the tag too,
    unless someone set a kind on purpose. (MLflow 3.17's UI picks its navigation from a UI-wide switch instead:
    the links this project prints carry :data:`UI_MODEL_TRAINING`.)
    """
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:
            # Another task created it between our lookup and create.
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


CONFIG_DIGEST_TAG = "m2d2.config_digest"
CONFIG_ARTIFACT = "config.json"  # the resolved configuration of the execution, on its parent run
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own key: the UI shows it as the run's git commit
GIT_DIRTY_TAG = "m2d2.git_dirty"
VERSION_TAG = "m2d2.version"


def config_digest(config: Any) -> str:
    """sha256 of the resolved configuration as canonical JSON: two executions with one digest ran one config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=_json_default).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """What code made a run: the package version, and the git commit and dirty flag when it runs from a checkout
    (``M2D2_GIT_COMMIT`` stands in where there is no ``.git``, e.g. an image built from a commit)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {VERSION_TAG: version("m2d2")}
    except PackageNotFoundError:
        tags = {VERSION_TAG: "unknown"}
    root = Path(__file__).resolve().parent.parent
    try:
        if not (root / "pyproject.toml").is_file():  # an installed copy, not a checkout: git would see another repo
            raise OSError("not a checkout")
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        tags.update({GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: str(bool(dirty)).lower()})
    except (OSError, subprocess.SubprocessError):
        if os.environ.get("M2D2_GIT_COMMIT"):
            tags[GIT_COMMIT_TAG] = os.environ["M2D2_GIT_COMMIT"]
    return tags


def start_pipeline_run(
    execution_id: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Create (or find) the parent run of one pipeline execution and return its id; the run is left RUNNING.

    Idempotent per ``execution_id``: Flyte retries a failed task in a new process, and a retry of the first task
    must return the parent it already created rather than open a second one. The lookup and create are not atomic,
    which is fine because retries of one task are sequential.
    """
    mlflow = client()
    exp_id = experiment_id(mlflow, experiment)
    existing = mlflow.search_runs(
        [exp_id],
        filter_string=f"tags.`{EXECUTION_TAG}` = {_quote(execution_id)} and tags.`{KIND_TAG}` = 'pipeline'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if existing:
        run_id = existing[0].info.run_id
        log.info("Reusing MLflow pipeline run %s for execution %s", run_id, execution_id)
        return run_id
    all_tags = {**code_version(), **(tags or {}), EXECUTION_TAG: execution_id, KIND_TAG: "pipeline"}
    if params:
        all_tags[CONFIG_DIGEST_TAG] = config_digest(params)
    run = mlflow.create_run(
        exp_id, tags={t.key: t.value for t in _tags(all_tags)}, run_name=f"pipeline-{execution_id}"
    )
    run_id = run.info.run_id
    if params:
        _log_params(mlflow, run_id, params)
        mlflow.log_dict(run_id, redact(json.loads(json.dumps(params, default=_json_default))), CONFIG_ARTIFACT)
    log.info("Created MLflow pipeline run %s for execution %s", run_id, execution_id)
    return run_id


def finish_pipeline_run(
    run_id: str,
    status: str = "FINISHED",
    tags: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Log final tags and summary metrics (step 0) on the parent run, then terminate it with ``status``."""
    RunStatus.from_string(status)  # fail early on a typo rather than after logging
    mlflow = client()
    timestamp = _now_ms()
    _log_batch(mlflow, run_id, [Metric(k, float(v), timestamp, 0) for k, v in (metrics or {}).items()], _tags(tags))
    _terminate(mlflow, run_id, status)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _terminate(mlflow: MlflowClient, run_id: str, status: str) -> None:
    """``set_terminated``, without MLflow's run link on stdout when the tracking URI holds credentials: the link
    is the raw URI (``http://user:pass@host/#/...``), and stdout ends up in task logs."""
    quiet = contextlib.nullcontext()
    if redact_url(mlflow.tracking_uri) != mlflow.tracking_uri and not os.environ.get(_SUPPRESS_LINK):
        quiet = _env(_SUPPRESS_LINK, "true")
    with quiet:
        mlflow.set_terminated(run_id, status=status)


def _log_params(mlflow: MlflowClient, run_id: str, params: Any) -> None:
    items = [Param(key, _clean(value, MAX_PARAM_VALUE, key)) for key, value in flatten(params).items()]
    for chunk in _chunks(items, PARAMS_PER_BATCH):
        mlflow.log_batch(run_id, params=chunk)


def _log_batch(mlflow: MlflowClient, run_id: str, metrics: Sequence[Metric], tags: Sequence[RunTag] = ()) -> None:
    for chunk in _chunks(list(tags), PARAMS_PER_BATCH):
        mlflow.log_batch(run_id, tags=chunk)
    for chunk in _chunks(list(metrics), METRICS_PER_BATCH):
        mlflow.log_batch(run_id, metrics=chunk)


# What a tracking call raises when the server is away: MLflow's own errors once its retries run out, and the
# transport's (connection refused or reset, timeouts) where they surface as they are.
_UNREACHABLE = (MlflowException, OSError, ConnectionError, TimeoutError)
# A best-effort call does not wait out MLflow's default HTTP retries (up to minutes): training goes on, and the
# call is retried after a backoff instead. Unless the user set their own.
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BUFFER_LIMIT = 200_000  # metric values a stage keeps for a tracking server that is away (oldest dropped first)
GAP_TAG = "m2d2.tracking_gap"


def _is_outage(exc: BaseException) -> bool:
    """The server is away or failing (retry later), as opposed to refusing the request itself."""
    if not isinstance(exc, MlflowException):
        return True
    return exc.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or any(
        word in str(exc.message) for word in ("Max retries exceeded", "Connection", "connection", "timed out"))


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _QUICK_HTTP}
    for key, value in _QUICK_HTTP.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


class StageRun:
    """The child run of one pipeline stage; inert on every rank but the main one.

    Metrics are buffered and sent with ``log_batch`` every ``flush_every`` calls to :meth:`log_metrics` (and on
    exit), so a training loop pays one HTTP request per ``flush_every`` steps instead of one per step.

    **Best effort: tracking never stops training.** A stage that starts while the server is down trains anyway and
    keeps trying to create its run; params and tags wait for it. Metrics that cannot be sent stay buffered (at most
    ``buffer_limit`` values; beyond, the oldest are dropped and counted) with their original steps and timestamps,
    and go out when the server answers again; each failure backs off (1 s doubling to 5 min) before the next try,
    and no call waits out MLflow's long HTTP retries. If the server never comes back, the stage still finishes;
    :meth:`end` logs the gap, and records it on the run (``m2d2.tracking_gap``) once it can.

    Use as a context manager (FAILED if an exception escapes, which is re-raised) or call :meth:`start` and
    :meth:`end` explicitly.
    """

    def __init__(
        self,
        parent_run_id: str,
        stage: str,
        params: Any = None,
        tags: Mapping[str, Any] | None = None,
        flush_every: int = 20,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        self.parent_run_id = parent_run_id
        self.stage = stage
        self.active = is_main_process()
        self._params = params
        self._tags = dict(tags or {})
        self._flush_every = max(1, flush_every)
        self._pending: collections.deque[Metric] = collections.deque()
        self._buffer_limit = max(1, buffer_limit)
        self._dropped = 0
        self._deferred: list[tuple[str, tuple]] = []  # params, tags and artefacts waiting for the run
        self._calls = 0
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._started = False
        self._ended = False
        self._retry_at = 0.0
        self._backoff = 1.0
        self._outage_since: float | None = None

    @property
    def run_id(self) -> str | None:
        """The child run id once created on the main rank; None elsewhere (or while the server is away)."""
        return self._run_id

    @property
    def dropped(self) -> int:
        """Metric values dropped because the buffer was full while the server was away."""
        return self._dropped

    def start(self) -> Self:
        """Create the child run in the parent's experiment (main rank only; a second call is a no-op). A server
        that does not answer does not stop the caller: the run is created at a later flush."""
        if not self.active or self._started:
            return self
        self._started = True
        self._client = client()
        self._ensure_run()
        return self

    def _ensure_run(self) -> bool:
        if self._run_id is not None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        tags = {**code_version(), **self._tags, PARENT_TAG: self.parent_run_id, STAGE_TAG: self.stage,
                KIND_TAG: "stage"}

        def create() -> None:
            experiment_id = self._client.get_run(self.parent_run_id).info.experiment_id
            run = self._client.create_run(experiment_id, tags={t.key: t.value for t in _tags(tags)},
                                          run_name=self.stage)
            self._run_id = run.info.run_id

        if not self._attempt(create, "create the run"):
            return False
        log.info("Started MLflow run %s for stage %s (parent %s)", self._run_id, self.stage, self.parent_run_id)
        if self._params:
            self._deferred.insert(0, ("params", (self._params,)))
        self._send_deferred()
        return True

    def _attempt(self, call, what: str) -> bool:
        """Run a tracking call; on failure note the outage and when to try again. True if it went through."""
        try:
            with _quick_http():
                call()
        except _UNREACHABLE as exc:
            if not _is_outage(exc):
                raise  # a request the server refused on its merits (a bad value): a bug, not an outage
            now = time.monotonic()
            if self._outage_since is None:
                self._outage_since = now
                log.warning("MLflow did not answer (%s: %s); stage %s trains on and keeps its metrics for later",
                            what, redact_url(str(exc))[:300], self.stage)
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, 300.0)
            return False
        if self._outage_since is not None:
            log.warning("MLflow answers again after %.0f s; stage %s sends what it kept",
                        time.monotonic() - self._outage_since, self.stage)
            self._outage_since = None
        self._backoff = 1.0
        return True

    def _send(self, kind: str, args: tuple) -> None:
        mlflow, run_id = self._client, self._run_id
        if kind == "params":
            _log_params(mlflow, run_id, *args)
        elif kind == "tags":
            _log_batch(mlflow, run_id, [], _tags(*args))
        elif kind == "text":
            mlflow.log_text(run_id, *args)
        elif kind == "artifact":
            mlflow.log_artifact(run_id, *args)
        else:
            mlflow.log_artifacts(run_id, *args)

    def _send_deferred(self) -> None:
        while self._deferred and self._run_id is not None:
            kind, args = self._deferred[0]
            if not self._attempt(functools.partial(self._send, kind, args), f"log {kind}"):
                return
            self._deferred.pop(0)

    def _live(self) -> MlflowClient | None:
        return self._client if self._run_id is not None and not self._ended else None

    def _later(self, kind: str, *args: Any) -> None:
        """Send now if the run exists and the server answers, else keep it for when it does."""
        if not self.active or not self._started or self._ended:
            return
        self._deferred.append((kind, args))
        if self._ensure_run():
            self._send_deferred()

    def log_params(self, params: Any) -> None:
        """Log a (nested) mapping or dataclass as dotted-key params (stringified, truncated to 6000 chars).

        MLflow params are write-once: re-logging a key with a different value is an error, so log each key once.
        """
        self._later("params", params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer one step of metrics; NaN/inf are logged as they are (MLflow stores them)."""
        if not self.active or not self._started or self._ended:
            return
        timestamp = _now_ms()
        for k, v in metrics.items():
            if len(self._pending) >= self._buffer_limit:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append(Metric(str(k), float(v), timestamp, int(step)))
        self._calls += 1
        if self._calls % self._flush_every == 0 or len(self._pending) >= METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics now (oldest first); what the server does not take stays buffered."""
        if not self.active or not self._started or not self._pending or not self._ensure_run():
            return
        self._send_deferred()
        while self._pending:
            chunk = list(itertools.islice(self._pending, METRICS_PER_BATCH))
            if not self._attempt(lambda c=chunk: self._client.log_batch(self._run_id, metrics=c), "log metrics"):
                return
            for _ in chunk:
                self._pending.popleft()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._later("tags", dict(tags))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` (credentials masked) as indented JSON to ``artifact_file``; dataclasses become objects,
        other types ``str``."""
        self._later("text", json.dumps(redact(obj), indent=2, default=_json_default), artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._later("artifact", os.fspath(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._later("artifacts", os.fspath(local_dir), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Send what is kept and terminate the run with ``status`` (once; later calls are no-ops). If the server is
        still away, the stage ends anyway: the gap is logged (and tagged on the run if it exists by then)."""
        if not self.active or not self._started or self._ended:
            return
        self._retry_at = 0.0  # one more try now, whatever the backoff says
        self.flush()
        self._retry_at = 0.0
        if self._ensure_run():
            self._send_deferred()
        unsent = len(self._pending) + self._dropped
        if unsent or self._deferred:
            gap = (f"{len(self._pending)} metric values unsent, {self._dropped} dropped (buffer full), "
                   f"{len(self._deferred)} params/tags/artefacts unsent: the tracking server was away")
            log.warning("stage %s: %s", self.stage, gap)
            if self._run_id is not None:
                self._attempt(lambda: self._client.set_tag(self._run_id, GAP_TAG, gap), "record the gap")
        self._ended = True
        if self._run_id is not None:
            self._attempt(lambda: _terminate(self._client, self._run_id, status), "close the run")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
            return
        try:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except Exception:  # never mask the exception that is propagating
            log.exception("Could not close MLflow run %s", self._run_id)


def find_stage_run(parent_run_id: str, stage: str) -> str | None:
    """The id of the most recent child run of ``stage`` under ``parent_run_id``, or None."""
    mlflow = client()
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = {_quote(parent_run_id)} and tags.`{STAGE_TAG}` = {_quote(stage)}",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def record_cache_hits(parent_run_id: str, stage_sources: Mapping[str, str | None]) -> dict[str, bool]:
    """Tag the parent with where each stage's output came from; return stage -> cache hit.

    Each stage output carries the id of the run that produced it. When Flyte serves a task from its cache the
    output (and so that id) is from an earlier execution, whose run has a different parent: that is a cache hit.
    Stages with a None source (nothing tracked) are skipped. A source run that no longer exists counts as a hit:
    it cannot have been created under this parent.
    """
    mlflow = client()
    hits: dict[str, bool] = {}
    tags: dict[str, str] = {}
    for stage, source in stage_sources.items():
        if not source:
            continue
        try:
            source_parent = mlflow.get_run(source).data.tags.get(PARENT_TAG)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("Source run %s of stage %s not found; counting it as a cache hit", source, stage)
            source_parent = None
        hits[stage] = source_parent != parent_run_id
        tags[f"m2d2.{stage}.source_run"] = source
        tags[f"m2d2.{stage}.cache_hit"] = str(hits[stage]).lower()
    _log_batch(mlflow, parent_run_id, [], _tags(tags))
    return hits


def run_url(run_id: str) -> str | None:
    """A link to the run in the MLflow UI when tracking goes to an http(s) server (credentials masked), else None."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        experiment_id = client().get_run(run_id).info.experiment_id
    except MlflowException:
        log.warning("Cannot build a UI link: run %s not found at %s", run_id, redact_url(uri))
        return None
    # A link is for showing: a browser asks for the credentials rather than finding them in a log. MLflow 3.17 picks
    # its navigation (GenAI or model training) from the link's workflowType, not from the experiment's kind tag.
    return redact_url(f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{UI_MODEL_TRAINING}")


def write_pipeline_summary(data_root: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    """Write ``summary`` (credentials masked) as ``<data_root>/summaries/<parent run>.json`` and as the
    ``latest-summary.json`` that ``m2d2 summary`` reads; returns the first path.

    The summary records the tracking URI, which may carry a password; the files outlive the run and are read by
    anyone with access to the data root.
    """
    from m2d2.io import atomic_write_bytes
    from m2d2.summary import SUMMARY_FILE

    blob = json.dumps(redact(summary), indent=2).encode()
    root = Path(data_root)
    path = root / "summaries" / f"{summary['mlflow_parent_run_id']}.json"
    atomic_write_bytes(path, blob)
    atomic_write_bytes(root / SUMMARY_FILE, blob)
    return path


__all__ = [
    "DEFAULT_TRACKING_URI",
    "StageRun",
    "client",
    "finish_pipeline_run",
    "find_stage_run",
    "flatten",
    "is_main_process",
    "record_cache_hits",
    "run_url",
    "start_pipeline_run",
    "tracking_uri",
    "write_pipeline_summary",
]
