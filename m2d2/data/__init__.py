"""Data: manifests, the demo corpus, feature stores and loaders."""

from m2d2.data.demo import (
    DEMO_CLASSES,
    DEMO_MANIFEST_SCHEMA,
    DemoClip,
    DemoCorpusConfig,
    generate_demo_corpus,
    plan_demo_corpus,
    zero_shot_prompt,
)

__all__ = [
    "DEMO_CLASSES",
    "DEMO_MANIFEST_SCHEMA",
    "DemoClip",
    "DemoCorpusConfig",
    "generate_demo_corpus",
    "plan_demo_corpus",
    "zero_shot_prompt",
]
