"""A Flyte workflow of the workflow's shape (plan -> map over ShardRefs -> finish), for
tests/integration/test_shard_primitive.py."""

from __future__ import annotations

from flytekit import Cache, map_task, task, workflow

from m2d2.shards import ShardRef, plan_of, shard_refs


@task(cache=Cache(version="1"))
def plan() -> list[ShardRef]:
    return shard_refs("plan.json", 3, workspace="ws")


@task(cache=Cache(version="1"))
def shard(ref: ShardRef) -> str:
    assert isinstance(ref, ShardRef), type(ref)
    return f"{ref.plan}:{ref.index}:{ref.workspace}"


@task
def finish(shards: list[ShardRef], built: list[str]) -> str:
    return plan_of(shards) + "|" + ",".join(built)


@workflow
def mapped() -> str:
    refs = plan()
    return finish(shards=refs, built=map_task(shard, concurrency=2)(ref=refs))
