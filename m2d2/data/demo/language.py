"""Caption grammar of the demo corpus: word lists, the template language of the recipes, and caption choice.

The recipes describe their captions as templates over attribute-dependent word lists; this module turns them into
sentences. Keeping the grammar (articles, counts, plurals, loudness and background phrases) in one place means
every class words numbers, tempo and loudness the same way, which is what lets captions be checked against the
drawn attributes.

Template language, used by :func:`render_captions`:

- ``$name`` is a word: ``$count`` ("three") and ``$times`` ("once", "twice", "three times") come from the clip's
  event count; any other name is drawn from the recipe's :class:`Words` (or the shared ``$loud``, ``$tempo_adv``,
  ``$tempo_adj``). A word may be empty ("moderate" loudness), so spacing around it is not guaranteed.
- ``{...}`` is a phrase: its space-separated tokens are joined, dropping empty ones; a leading ``a`` token asks for
  the right indefinite article; a token ``one|many`` is the singular when the clip has one event, else the plural.
- ``[...]`` is kept only when the clip has more than one event (tempo words mean nothing for a single toll).

Words are drawn in reading order, so the order of the templates and of the words in them is part of the
corpus: changing it changes the captions (and only the captions) of every clip.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m2d2.text.prompt import PROMPT_TEMPLATE

Rng = np.random.Generator

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: Every count word a caption may use; tests check that exactly the right one appears.
COUNT_WORD_RE = re.compile(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|once|twice)\b")


def zero_shot_prompt(label: str) -> str:
    """The zero-shot classification prompt for ``label``; training captions never contain its ``can be heard``."""
    return PROMPT_TEMPLATE.format(label)


def pick(rng: Rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def join(*words: str) -> str:
    return " ".join(w for w in words if w)


def with_article(phrase: str) -> str:
    """Prefix the right indefinite article."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{_NUMBER_WORDS[n]} times")


@dataclass(frozen=True)
class Words:
    """Where one caption word comes from: the options for each value of the clip attribute ``by``.

    An option that is a string is that word (nothing is drawn); a tuple is picked from. ``once`` words are drawn
    once per clip, in the order the recipe lists them and before any template, so every caption of a clip agrees
    (one clip's siren does not both "wail slowly" and "yelp rapidly"); the others are drawn at each use, for
    variety. ``p`` below 1 leaves the word out of the other captions (one extra draw decides).
    """

    by: str
    options: Mapping[Any, str | tuple[str, ...]]
    once: bool = False
    p: float = 1.0

    def draw(self, rng: Rng, attributes: Mapping[str, Any]) -> str:
        if self.p < 1.0 and rng.random() >= self.p:
            return ""
        options = self.options[attributes[self.by]]
        return options if isinstance(options, str) else pick(rng, options)


LOUDNESS = {"quiet": ("faint", "quiet", "soft", "distant"), "loud": ("loud", "very loud", "strong"), "moderate": ("",)}

#: Words every recipe may use: loudness (from the drawn peak level) and tempo (for classes that draw ``tempo``).
SHARED_WORDS: dict[str, Words] = {
    "loud": Words("level", LOUDNESS, p=0.6),
    "tempo_adv": Words(
        "tempo",
        {
            "fast": ("quickly", "in quick succession", "rapidly", "in a fast rhythm"),
            "slow": ("slowly", "with long pauses", "at a slow pace", "unhurriedly"),
        },
    ),
    "tempo_adj": Words("tempo", {"fast": ("quick", "rapid", "fast"), "slow": ("slow", "unhurried", "well-spaced")}),
}

_OPTIONAL = re.compile(r"\[([^\]]*)\]")
_SLOT = re.compile(r"\{([^}]*)\}|\$(\w+)")
_WORD = re.compile(r"\$(\w+)")


def render_captions(
    templates: Sequence[str], words: Mapping[str, Words], attributes: Mapping[str, Any], rng: Rng
) -> list[str]:
    """Every template of a recipe filled in for one clip (see the module docstring for the template language)."""
    vocabulary = {**SHARED_WORDS, **words}
    count = attributes.get("count", 0)
    drawn = {name: w.draw(rng, attributes) for name, w in words.items() if w.once}

    def word(name: str) -> str:
        if name == "count":
            return _NUMBER_WORDS[count]
        if name == "times":
            return times(count)
        return drawn[name] if name in drawn else vocabulary[name].draw(rng, attributes)

    def token(text: str) -> str:
        if "|" in text:
            one, many = text.split("|")
            text = one if count == 1 else many
        return _WORD.sub(lambda m: word(m[1]), text)

    def slot(m: re.Match[str]) -> str:
        if m[2] is not None:
            return word(m[2])
        tokens = m[1].split()
        if tokens[0] == "a":
            return with_article(join(*(token(t) for t in tokens[1:])))
        return join(*(token(t) for t in tokens))

    return [_SLOT.sub(slot, _OPTIONAL.sub(lambda m: m[1] if count > 1 else "", t)) for t in templates]


_BACKGROUND = {
    ("none", "faint"): ("in a quiet room", "with no background noise", "against silence"),
    ("hiss", "faint"): ("over faint background hiss", "with a light hiss underneath", "over soft static"),
    ("hiss", "noticeable"): (
        "over noticeable background hiss",
        "with steady static in the background",
        "against a hissing noise floor",
    ),
    ("hum", "faint"): ("over a faint mains hum", "with a low electrical hum in the background", "over a soft hum"),
    ("hum", "noticeable"): (
        "over a noticeable electrical hum",
        "with a buzzing mains hum underneath",
        "against a droning hum",
    ),
}


def choose_captions(
    candidates: Sequence[str], background: str, snr_db: float | None, k: int, rng: Rng
) -> tuple[str, ...]:
    """``k`` distinct captions from a clip's candidates, some with a phrase about the background."""
    order = rng.permutation(len(candidates))
    strength = "faint" if background == "none" or (snr_db or 0.0) >= 20.0 else "noticeable"
    out: list[str] = []
    for i in order:
        text = candidates[int(i)]
        if rng.random() < (0.3 if background == "none" else 0.7):
            text = f"{text}, {pick(rng, _BACKGROUND[background, strength])}"
        text = re.sub(r"\s+", " ", text).strip()
        text = text[0].upper() + text[1:]
        if text not in out:
            out.append(text)
        if len(out) == k:
            break
    return tuple(out)
