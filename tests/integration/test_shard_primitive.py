"""The shard primitive on ``s3://`` (moto on loopback): the root-parametrised tests of
tests/unit/test_shard_primitive.py, imported here and run with an s3:// root; and a Flyte map task over ShardRefs
(tests/integration/flyte_shard_refs.py)."""

from __future__ import annotations

import pytest

from tests.unit.test_shard_primitive import (  # noqa: F401 (collected here again, with this module's ``root``)
    test_a_killed_build_is_rebuilt,
    test_a_marker_whose_outputs_changed_or_vanished_is_not_trusted,
    test_a_stale_marker_is_not_trusted_and_goes_before_the_rebuild,
    test_a_streamed_output_appears_whole_or_not_at_all,
    test_build_is_idempotent_and_the_marker_records_every_output,
)


@pytest.fixture(params=["s3"])
def root(request, tmp_path, s3) -> str:
    """A job root in the moto bucket of the ``s3`` fixture (tests/integration/conftest.py)."""
    return f"s3://m2d2-data/primitive/{tmp_path.name}"


def test_flyte_maps_a_task_over_shard_refs():
    """The workflow's map tasks take ShardRefs: Flyte carries the dataclass through a map over a list of them."""
    from tests.integration.flyte_shard_refs import mapped

    assert mapped() == "plan.json|plan.json:0:ws,plan.json:1:ws,plan.json:2:ws"
