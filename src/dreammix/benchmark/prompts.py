"""Benchmark prompts per subject: 3–5 for identity preservation, 3–5 for attribute editing (§4.1).

The paper only says "3–5 prompts for identity preservation or attribute editing for each object",
so we build them from published material, deterministically:

- **Identity preservation** prompts name the subject and nothing else (config
  ``benchmark.prompts.identity_templates``; default: the source prompt ``a photo of sks <class>``
  and the published DreamBooth prompts' subject phrase ``a sks <class>``). The published prompts'
  context clauses ("in the jungle", "on the beach") are dropped on purpose: in inpainting the
  context is the COCO background, and a prompt that contradicts it would score the scene, not the
  subject.
- **Attribute editing** prompts are the published DreamBooth attribute prompts ``a red sks <class>``,
  ``a purple …``, ``a shiny …``, ``a wet …``, ``a cube shaped …`` (parsed from
  ``prompts_and_classes.txt``, not hard-coded). When the subject config carries an attribute
  dictionary (``attributes:`` category → words, from ADM), an attribute the subject already has is
  no edit ("a red sks can" for a red can), so such prompts are dropped and replaced by words of
  the same categories from ``benchmark.prompts.edit_vocabulary`` that the subject does not have,
  in a seeded order.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dreammix.data.dreambooth import DreamBoothFacts
from dreammix.errors import DreamMixError

#: A published attribute prompt: ``'a <attribute> {0} {1}'`` with nothing after the class.
_ATTRIBUTE_TEMPLATE_RE = re.compile(r"^a (?P<attribute>[^{}]+?) \{0\} \{1\}$")


@dataclass(frozen=True)
class SubjectSpec:
    """What the benchmark needs of a subject: name, class noun, live/object, attribute dictionary."""

    name: str
    class_noun: str
    kind: str = "object"
    attributes: Mapping[str, Sequence[str]] = field(default_factory=dict)


def published_attribute_words(facts: DreamBoothFacts, kind: str) -> list[str]:
    """The attribute words of the published prompts for a live/object subject, in list order."""
    templates = facts.live_prompts if kind == "live" else facts.object_prompts
    words = []
    for template in templates:
        match = _ATTRIBUTE_TEMPLATE_RE.match(template)
        if match and match.group("attribute") not in words:
            words.append(match.group("attribute"))
    return words


def _fill(template: str, identifier: str, class_noun: str, where: str, **extra: str) -> str:
    try:
        text = template.format(identifier=identifier, class_noun=class_noun, **extra)
    except (KeyError, IndexError, ValueError) as exc:
        raise DreamMixError(
            f"bad prompt template {template!r}: use the fields {{identifier}}, {{class_noun}}"
            + (", {attribute}" if extra else ""),
            where,
        ) from exc
    return " ".join(text.split())


def identity_prompts(subject: SubjectSpec, templates: Sequence[str], identifier: str = "sks") -> list[str]:
    """The identity-preservation prompts of one subject (duplicates removed, order kept)."""
    if not templates:
        raise DreamMixError("no identity prompt templates", "benchmark.prompts.identity_templates")
    prompts: list[str] = []
    for template in templates:
        if "{identifier}" not in template:
            raise DreamMixError(f"identity template {template!r} lacks {{identifier}}", "benchmark.prompts.identity_templates")
        text = _fill(template, identifier, subject.class_noun, "benchmark.prompts.identity_templates")
        if text not in prompts:
            prompts.append(text)
    return prompts


def _mentions(phrase: str, word: str) -> bool:
    """Whether ``word`` (one or more words) occurs in ``phrase`` as whole words, ignoring case."""
    return re.search(rf"(?<![\w-]){re.escape(word.lower())}(?![\w-])", phrase.lower()) is not None


def attribute_prompts(
    subject: SubjectSpec,
    facts: DreamBoothFacts,
    *,
    count: int = 5,
    identifier: str = "sks",
    template: str = "a {attribute} {identifier} {class_noun}",
    edit_vocabulary: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> list[str]:
    """The attribute-editing prompts of one subject (see the module docstring for the rule)."""
    if count < 1:
        raise DreamMixError(f"attribute prompt count must be at least 1, got {count}", "benchmark.prompts.attribute_count")
    words = published_attribute_words(facts, subject.kind)
    own = [str(w) for values in subject.attributes.values() for w in (values or [])]
    if own:
        words = [w for w in words if not any(_mentions(o, w) for o in own)]
        vocabulary = {str(k).lower(): list(v) for k, v in (edit_vocabulary or {}).items()}
        extra: list[str] = []
        for category in sorted(str(c).lower() for c in subject.attributes):
            for word in vocabulary.get(category, []):
                if word not in words and word not in extra and not any(_mentions(o, word) for o in own):
                    extra.append(word)
        # Seeded by subject name so a subject's prompts do not depend on which others are built.
        random.Random(f"{seed}:{subject.name}:attribute").shuffle(extra)
        words = words + extra
    if not words:
        raise DreamMixError(f"no attribute-editing prompt left for subject '{subject.name}'", "benchmark.prompts")
    prompts = [
        _fill(template, identifier, subject.class_noun, "benchmark.prompts.attribute_template", attribute=w)
        for w in words[:count]
    ]
    # "a orange sks can" -> "an orange sks can" (vocabulary words may start with a vowel).
    return [re.sub(r"\ba (?=[aeiouAEIOU])", "an ", p) for p in prompts]
