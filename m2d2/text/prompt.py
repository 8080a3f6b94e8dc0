"""The zero-shot prompt, defined once: evaluation, the pipeline and the demo corpus (whose training captions must
never contain it) all read this template. Task-specific rules (paper Table VI) are in :mod:`m2d2.eval.prompts`."""

PROMPT_TEMPLATE = "{} can be heard"
