"""Zero-shot caption rules per task (paper Table VI, as the reference EVAR ``zeroshot.py`` applies them).

A class label becomes one caption: ``_`` turns into a space, a task may replace the label by a fixed phrase
(CREMA-D's emotion codes), and the result fills the task's template. Every paper template ends in "can be
heard"; the default rule is the one for AudioSet, FSD50K, ESC-50 and US8K: ``"<label> can be heard"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from m2d2.text.prompt import PROMPT_TEMPLATE as DEFAULT_TEMPLATE

__all__ = ["DEFAULT_TEMPLATE", "PROMPT_RULES", "PromptRule", "class_prompts", "prompt_rule"]

# CREMA-D: the reference's fixed phrases, keyed by every spelling of the six classes (EVAR's metadata uses the
# dataset's three-letter codes).
_CREMAD_PHRASES = {
    "angry person talking": ("ang", "anger", "angry"),
    "someone talking in disgust": ("dis", "disgust", "disgusted"),
    "someone talking with a sense of fear": ("fea", "fear", "fearful"),
    "someone talking happily and joyfully": ("hap", "happy", "happiness", "joy"),
    "someone talking calmly": ("neu", "neutral", "calm"),
    "someone talking sadly": ("sad", "sadness"),
}


@dataclass(frozen=True)
class PromptRule:
    """How one task's labels become captions: ``template.format(phrases.get(label, label))``.

    ``phrases`` keys are matched case-insensitively against the label after ``_`` -> space; ``strict`` makes a
    label without a phrase an error (for tasks whose rule lists every class).
    """

    template: str = DEFAULT_TEMPLATE
    phrases: Mapping[str, str] = field(default_factory=dict)
    strict: bool = False

    def __post_init__(self) -> None:
        if self.template.count("{}") != 1:
            raise ValueError(f"a prompt template needs exactly one '{{}}' for the label: {self.template!r}")
        object.__setattr__(self, "phrases", MappingProxyType({k.lower(): v for k, v in self.phrases.items()}))

    def caption(self, label: str) -> str:
        text = str(label).replace("_", " ").strip()
        phrase = self.phrases.get(text.lower())
        if phrase is None and self.strict:
            raise ValueError(f"label {label!r} has no phrase in this rule; known: {sorted(self.phrases)}")
        return self.template.format(text if phrase is None else phrase)


PROMPT_RULES: Mapping[str, PromptRule] = MappingProxyType({
    "default": PromptRule(),
    "as": PromptRule(),  # AudioSet: the display_name of class_labels_indices.csv as the label
    "fsd50k": PromptRule(),
    "esc50": PromptRule(),
    "us8k": PromptRule(),
    "cremad": PromptRule(phrases={k: p for p, keys in _CREMAD_PHRASES.items() for k in keys}, strict=True),
    "gtzan": PromptRule("{} music can be heard"),
    "nsynth": PromptRule("the musical instrument sound of {} can be heard"),
})


def prompt_rule(task: str | PromptRule | None) -> PromptRule:
    """The rule of a task name in :data:`PROMPT_RULES` (case-insensitive, ``-``/``_`` ignored), a rule as is, or
    the default for None. An unknown name is an error rather than a silent default."""
    if task is None:
        return PROMPT_RULES["default"]
    if isinstance(task, PromptRule):
        return task
    key = task.lower().replace("-", "").replace("_", "")
    if key not in PROMPT_RULES:
        raise ValueError(f"no prompt rule for task {task!r}; known: {sorted(PROMPT_RULES)} (or pass a PromptRule)")
    return PROMPT_RULES[key]


def class_prompts(task: str | PromptRule | None, labels: Sequence[str]) -> list[str]:
    """One caption per class label, in label order."""
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of class names, not one string")
    rule = prompt_rule(task)
    return [rule.caption(label) for label in labels]
