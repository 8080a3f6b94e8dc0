"""Every Flyte entity serialises for the cluster (`pyflyte package`) with the images, topology and schedule we expect.

One real `pyflyte --pkgs workflows package` with the paper topology on 2 nodes; the protobufs it writes are what
Flyte admin would store, so the PyTorchJob spec, GPU requests, pod templates and the schedule are checked there.
The workflow module imported in this process (`make demo`'s topology, the stage registry it walks) is checked here
too; what the tasks rely on without the workflow module is in tests/unit/test_flyte_entities.py.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tarfile
from pathlib import Path

import msgpack
import pytest
from flyteidl.admin import launch_plan_pb2, task_pb2
from google.protobuf.json_format import MessageToDict

from tests.helpers import REPO_ROOT as ROOT
from tests.helpers import subprocess_env

PYFLYTE = Path(sys.executable).with_name("pyflyte")
TRAINER, CPU = "ghcr.io/example/m2d2-trainer:v1", "ghcr.io/example/m2d2-cpu:v1"
TRAINING = {"stage1": 4, "stage1_1": 1, "stage2": 4, "stage2_1": 4, "stage2_as": 4,
            "stage2_1_as": 4}  # task -> GPUs per node (paper preset)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("package")
    env = subprocess_env(M2D2_TOPOLOGY="paper", M2D2_NNODES="2", M2D2_NOTIFY_EMAIL="ml@example.com",
                         M2D2_RETRAIN_CRON="0 4 * * 1", M2D2_SNAPSHOTS="s3://bucket/corpus")
    proc = subprocess.run(
        [str(PYFLYTE), "--pkgs", "workflows", "package", "--image", CPU, "--image", f"trainer={TRAINER}",
         "--image", f"cpu={CPU}", "-o", str(out / "pkg.tgz"), "--force"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with tarfile.open(out / "pkg.tgz") as tar:
        tar.extractall(out / "pkg", filter="data")
    entities = {}
    for path in sorted((out / "pkg").glob("*.pb")):
        name = path.stem.split("_", 1)[1].rsplit("_", 1)[0]
        message = launch_plan_pb2.LaunchPlan() if name.startswith("m2d2_") else task_pb2.TaskSpec()
        if name.startswith("workflows.full.full"):
            continue  # workflow closures: the tasks and launch plans are what we check
        if name.endswith("-arraynode"):  # the map-task nodes over a task's elements
            entities.setdefault("_map_nodes", []).append(name.removeprefix("workflows.full."))
            continue
        message.ParseFromString(path.read_bytes())
        entities[name.removeprefix("workflows.full.")] = MessageToDict(message)
    return entities


@pytest.mark.slow
def test_training_tasks_are_pytorch_jobs_on_gpus(package):
    for name, gpus in TRAINING.items():
        template = package[name]["template"]
        assert template["type"] == "pytorch", name  # 2 nodes: a PyTorchJob through the training operator
        elastic = template["custom"]["elasticConfig"]
        assert (elastic["minReplicas"], elastic["maxReplicas"], elastic["nprocPerNode"]) == (2, 2, gpus), name
        assert template["custom"]["workerReplicas"]["replicas"] == 2
        requests = {r["name"]: r["value"] for r in template["container"]["resources"]["requests"]}
        assert requests["GPU"] == str(gpus), name
        assert template["container"]["image"] == TRAINER
        meta = template["metadata"]
        assert meta["podTemplateName"] == "m2d2-gpu" and meta["interruptible"] and meta["retries"]["retries"] == 3
        assert meta["cacheIgnoreInputVars"] == ["parent_run_id"]
        assert template["extendedResources"]["gpuAccelerator"]["device"] == "nvidia-h100"
        env = {e["key"]: e["value"] for e in template["container"]["env"]}
        # The pod re-imports the workflow module: it must resolve the same topology there.
        assert (env["M2D2_TOPOLOGY"], env["M2D2_NNODES"], env["M2D2_NPROC_PER_NODE"]) == ("paper", "2", str(gpus))


@pytest.mark.slow
def test_cpu_tasks_use_the_cpu_image_without_gpus(package):
    cpu_tasks = {"open_workspace", "start_tracking", "resolve_corpus", "make_corpus", "plan_features",
                 "feature_shard", "finish_features", "plan_captions", "finish_captions", "evaluate", "finish_tracking",
                 "split_settings", "check_views"}
    assert cpu_tasks | set(TRAINING) <= set(package)
    for name in cpu_tasks:
        template = package[name]["template"]
        assert template["type"] == "python-task" and template["container"]["image"] == CPU, name
        assert template["metadata"]["podTemplateName"] == "m2d2-default"
        assert "GPU" not in {r["name"] for r in template["container"]["resources"].get("requests", [])}


@pytest.mark.slow
def test_feature_and_caption_shards_are_map_tasks(package):
    """Log-mel shards fan out over CPU pods; caption-embedding shards over GPU pods (the 7-B text encoder)."""
    assert {n.split("_", 1)[1].rsplit("_", 1)[0] for n in package["_map_nodes"]} == {"feature_shard", "caption_shard"}
    for name in ("feature_shard", "caption_shard"):
        meta = package[name]["template"]["metadata"]
        assert meta["discoverable"] and meta["retries"]["retries"] == 2, name  # cached and retried per element
    caption = package["caption_shard"]["template"]
    requests = {r["name"]: r["value"] for r in caption["container"]["resources"]["requests"]}
    assert requests["GPU"] == "1" and caption["container"]["image"] == TRAINER
    assert caption["metadata"]["podTemplateName"] == "m2d2-gpu"


@pytest.mark.slow
def test_launch_plans_paper_and_scheduled_retraining(package):
    paper, scheduled = package["m2d2_full_paper"]["spec"], package["m2d2_retrain_scheduled"]["spec"]
    assert "schedule" not in paper.get("entityMetadata", {})
    meta = scheduled["entityMetadata"]
    assert meta["schedule"]["cronSchedule"]["schedule"] == "0 4 * * 1"
    assert meta["notifications"][0]["email"]["recipientsEmail"] == ["ml@example.com"]
    assert {"FAILED", "SUCCEEDED"} <= set(meta["notifications"][0]["phases"])
    for spec in (paper, scheduled):
        binary = spec["defaultInputs"]["parameters"]["cfg"]["default"]["scalar"]["binary"]
        cfg = msgpack.unpackb(base64.b64decode(binary["value"]))  # the PipelineConfig default, as Flyte stores it
        assert cfg["preset"] == "paper" and cfg["stages"]["stage1.1"]["optim"]["name"] == "lars"
        assert cfg["corpus_source"] == "s3://bucket/corpus/latest"  # the newest snapshot, resolved at run time


def test_demo_topology_is_one_cpu_process():
    """Imported here without M2D2_TOPOLOGY: what `make demo` and `pyflyte run` locally get."""
    import workflows.full as wf

    assert not wf.USES_GPUS
    for name in TRAINING:
        entity = getattr(wf, name)
        assert (entity.task_config.nnodes, entity.task_config.nproc_per_node) == (1, 1)
        assert entity.resources.requests.gpu is None


def test_every_registered_stage_has_its_flyte_task_and_the_workflow_walks_the_registry():
    import workflows.full as wf
    from m2d2.pipeline.registry import STAGES

    assert list(wf.STAGE_TASKS) == [s.name for s in STAGES]
    nodes = [n.metadata.name for n in wf.full.nodes]
    assert all(any(n.endswith(wf.STAGE_TASKS[s.name].name.rsplit(".", 1)[-1]) for n in nodes) for s in STAGES)


def test_storage_and_training_failures_worth_a_retry_become_flyte_recoverable():
    """An object store that kept failing (m2d2.io.StorageError) or a lost peer reaches Flyte as recoverable, so the
    task's retries handle it; a bad input stays a user error."""
    from flytekit.exceptions.user import FlyteRecoverableException

    import workflows.full as wf
    from m2d2.io import StorageError
    from m2d2.train.engine import RecoverableTrainingError

    def fails(exc: BaseException):
        raise exc

    store = StorageError("s3://bucket/features/shards/shard-00003.npy", "upload", 8, 61.0, OSError("SlowDown"))
    with pytest.raises(FlyteRecoverableException, match=r"shard-00003\.npy: upload failed 8 times"):
        wf._recoverable(fails, store)
    with pytest.raises(FlyteRecoverableException, match="peer lost"):
        wf._recoverable(fails, RecoverableTrainingError("peer lost"))
    with pytest.raises(ValueError, match="bad manifest"):
        wf._recoverable(fails, ValueError("bad manifest"))
    assert wf._recoverable(lambda x: x + 1, 1) == 2
