"""Attribute dictionaries: reading, asking a VLM, composing regular prompts, TAS word selection.

An attribute dictionary maps a category to lowercase words, e.g.
``{"color": ["blue", "silver"], "material": ["aluminum"], "accessories": ["pull tab"]}``.
ADM (paper §3.3) recombines its words into regular prompts "a [attributes] [class] [attributes]"
so that no single word absorbs the subject's identity; TAS (§3.4) picks the words a user prompt
overrides ("a sks red can" → the dictionary colors) and removes them from the text embedding.

Everything here is plain Python (no torch), so inference can import it cheaply.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

#: The categories the VLM is asked for (a fixed set, which strict structured outputs need).
ATTRIBUTE_CATEGORIES = ("color", "material", "texture", "shape", "pattern", "breed", "accessories")

#: Adjective order before the class noun ("a fluffy round orange striped wooden corgi dog").
_BEFORE_ORDER = ("texture", "shape", "color", "pattern", "material", "breed")
#: Multi-word entries of these categories read as noun phrases: "with pointed ears".
_PHRASE_AFTER = frozenset({"texture", "shape", "pattern", "accessories"})

AttributeDict = dict[str, list[str]]


def attribute_schema(categories: Sequence[str] = ATTRIBUTE_CATEGORIES) -> dict[str, Any]:
    """JSON schema of the VLM's dictionary answer (strict mode: every key required, no others)."""
    return {
        "type": "object",
        "properties": {c: {"type": "array", "items": {"type": "string"}} for c in categories},
        "required": list(categories),
        "additionalProperties": False,
    }


PROMPTS_SCHEMA = {
    "type": "object",
    "properties": {"prompts": {"type": "array", "items": {"type": "string"}}},
    "required": ["prompts"],
    "additionalProperties": False,
}

ELIMINATE_SCHEMA = {
    "type": "object",
    "properties": {"eliminate": {"type": "array", "items": {"type": "string"}}},
    "required": ["eliminate"],
    "additionalProperties": False,
}


# ----------------------------------------------------------------------------------------------
# Reading and normalizing


def normalize_attributes(data: Any, where: str) -> AttributeDict:
    """Category → unique, lowercase, stripped words (empty categories dropped).

    Accepts a mapping of category → list of strings (a single string is taken as a one-word
    list); anything else is a :class:`DreamMixError` naming ``where``.
    """
    if hasattr(data, "items") and not isinstance(data, dict):  # OmegaConf DictConfig
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(data, resolve=True)
    if not isinstance(data, dict):
        raise DreamMixError(f"attribute dictionary must map category -> [words], got {type(data).__name__}", where)
    result: AttributeDict = {}
    seen: set[str] = set()
    for category, words in data.items():
        if isinstance(words, str):
            words = [words]
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise DreamMixError(f"category {category!r} must be a list of strings", where)
        key = str(category).strip().lower()
        clean = []
        for word in words:
            word = " ".join(word.lower().split())
            if word and word not in seen:
                seen.add(word)
                clean.append(word)
        if clean:
            result.setdefault(key, []).extend(clean)
    return result


def load_attributes_file(path: str | Path) -> AttributeDict:
    """An attribute dictionary from a JSON file ``{category: [words]}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DreamMixError("attribute file not found", str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DreamMixError(f"invalid JSON in attribute file: {exc}", str(path)) from exc
    attributes = normalize_attributes(data, str(path))
    if not attributes:
        raise DreamMixError("attribute file holds no words", str(path))
    return attributes


def offline_attributes(subject_cfg: Mapping[str, Any], regular_dir: str | Path | None = None) -> AttributeDict | None:
    """The dictionary available without a VLM, or ``None``.

    Order: ``subject.attributes_file`` (the user's explicit choice), then
    ``<regular_dir>/attributes.json`` (what an ADM run used, so inference matches training), then
    the ``subject.attributes`` mapping of the subject config.
    """
    file = subject_cfg.get("attributes_file")
    if file:
        return load_attributes_file(file)
    if regular_dir is not None and (Path(regular_dir) / "attributes.json").is_file():
        return load_attributes_file(Path(regular_dir) / "attributes.json")
    inline = subject_cfg.get("attributes")
    if inline:
        attributes = normalize_attributes(inline, "subject.attributes")
        return attributes or None
    return None


def ask_vlm_for_attributes(client, class_noun: str, images: Sequence[Any],
                           categories: Sequence[str] = ATTRIBUTE_CATEGORIES) -> AttributeDict:
    """Send the subject images to the VLM and return its (normalized) attribute dictionary."""
    if not images:
        raise DreamMixError("no subject images to send to the VLM", "subject.image_dir")
    answer = client.ask_json(
        client.prompt("attributes_system"),
        client.prompt("attributes_user", class_noun=class_noun, categories=", ".join(categories)),
        attribute_schema(categories),
        schema_name="attribute_dictionary",
        images=images,
    )
    attributes = normalize_attributes(answer, client.where)
    # The class noun itself is not an attribute ("a can can"); the VLM is asked not to echo it.
    attributes = {c: [w for w in ws if w != class_noun.lower()] for c, ws in attributes.items()}
    attributes = {c: ws for c, ws in attributes.items() if ws}
    if not attributes:
        raise DreamMixError("the VLM returned an empty attribute dictionary", client.where)
    return attributes


# ----------------------------------------------------------------------------------------------
# Regular prompts


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _split_before_after(
    attributes: Mapping[str, Sequence[str]],
) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Words that go before the class noun (per category), and (category, phrase) pairs that
    follow "with"."""
    before: dict[str, list[str]] = {}
    after: list[tuple[str, str]] = []
    for category, words in attributes.items():
        for word in words:
            if category == "accessories" or (category in _PHRASE_AFTER and " " in word):
                after.append((category, word))
            else:
                before.setdefault(category, []).append(word)
    return before, after


def compose_prompt(
    attributes: Mapping[str, Sequence[str]],
    class_noun: str,
    rng: random.Random,
    *,
    identifier: str | None = None,
    min_before: int = 1,
    max_before: int = 3,
    after_prob: float = 0.5,
) -> str:
    """One prompt "a [identifier] [attributes] <class_noun> [with ...]" drawn with ``rng``.

    At most one word per category goes before the noun (a color and a material, never two
    colors), in English adjective order; with probability ``after_prob`` one "with" phrase
    (an accessory, or a multi-word shape/pattern/texture of a category not used before) follows.
    """
    before, after = _split_before_after(attributes)
    categories = [c for c in _BEFORE_ORDER if c in before] + sorted(c for c in before if c not in _BEFORE_ORDER)
    k = rng.randint(min(min_before, len(categories)), min(max_before, len(categories))) if categories else 0
    chosen = sorted(rng.sample(categories, k), key=categories.index)
    words = [rng.choice(before[c]) for c in chosen]
    after = [phrase for category, phrase in after if category not in chosen]
    tail = f" with {rng.choice(after)}" if after and rng.random() < after_prob else ""
    middle = " ".join(([identifier] if identifier else []) + words + [class_noun])
    return f"{_article(middle)} {middle}{tail}"


def compose_prompts(
    attributes: Mapping[str, Sequence[str]],
    class_noun: str,
    n: int,
    seed: int,
    *,
    identifier: str | None = None,
    min_before: int = 1,
    max_before: int = 3,
    after_prob: float = 0.5,
    max_redraws: int = 20,
) -> list[str]:
    """``n`` regular prompts by seeded random recombination (deterministic for ``seed``).

    Prompt ``i`` depends only on ``(seed, i)`` and the prompts before it, so asking for more
    prompts later extends the list without changing its start (a resumed ADM run relies on it).
    A drawn prompt equal to an earlier one is redrawn a few times; small dictionaries may still
    repeat prompts, which is fine since every item has its own seed.
    """
    if min_before < 0 or max_before < min_before:
        raise DreamMixError(f"need 0 <= min_before <= max_before, got {min_before}, {max_before}", "adm.min_before")
    prompts: list[str] = []
    seen: set[str] = set()
    for i in range(n):
        rng = random.Random(f"dreammix-adm-prompt:{seed}:{i}")
        prompt = ""
        for _ in range(max_redraws):
            prompt = compose_prompt(attributes, class_noun, rng, identifier=identifier, min_before=min_before,
                                    max_before=max_before, after_prob=after_prob)
            if prompt not in seen:
                break
        seen.add(prompt)
        prompts.append(prompt)
    return prompts


def ask_vlm_for_prompts(client, attributes: Mapping[str, Sequence[str]], class_noun: str, n: int,
                        batch_size: int = 25) -> list[str]:
    """Up to ``n`` regular prompts written by the VLM, in batches (each answer cached).

    Prompts without the class noun are dropped (the regular set must show the class); the caller
    fills any shortfall with composed prompts.
    """
    prompts: list[str] = []
    noun = re.compile(rf"\b{re.escape(class_noun.lower())}\b")
    for batch in range((n + batch_size - 1) // batch_size):
        want = min(batch_size, n - len(prompts))
        if want <= 0:
            break
        answer = client.ask_json(
            client.prompt("regular_prompts_system"),
            client.prompt("regular_prompts_user", class_noun=class_noun, n=want, batch=batch + 1,
                          attributes=json.dumps(dict(attributes), ensure_ascii=False)),
            PROMPTS_SCHEMA,
            schema_name="regular_prompts",
        )
        for text in answer["prompts"]:
            text = " ".join(text.strip().strip('"').split())
            if text and noun.search(text.lower()) and text not in prompts:
                prompts.append(text)
    return prompts[:n]


# ----------------------------------------------------------------------------------------------
# TAS: which dictionary words does a prompt override?

def _prompt_terms(prompt: str) -> set[str]:
    tokens = re.findall(r"[a-z0-9\-]+", prompt.lower())
    return set(tokens) | {" ".join(tokens[i:i + 2]) for i in range(len(tokens) - 1)} | {
        " ".join(tokens[i:i + 3]) for i in range(len(tokens) - 2)
    }


def select_attributes_to_eliminate(prompt: str, attributes: Mapping[str, Sequence[str]], client=None) -> list[str]:
    """The attribute words TAS should remove for ``prompt`` (paper §3.4).

    With a VLM client the VLM picks them (answers cached); words it returns that are not in the
    dictionary are dropped, since TAS must only subtract the subject's own attributes; so are
    words the prompt itself repeats. Without a client (``vlm=offline``) the offline rule
    :func:`dreammix.tas.select_eliminate_words` decides (same-category dictionary words).
    """
    attributes = normalize_attributes(attributes, "attributes")
    if not attributes:
        return []
    if client is None:
        from dreammix.tas import select_eliminate_words  # torch-importing module: load on demand

        return list(select_eliminate_words(prompt, attributes))
    answer = client.ask_json(
        client.prompt("eliminate_system"),
        client.prompt("eliminate_user", prompt=prompt, attributes=json.dumps(attributes, ensure_ascii=False)),
        ELIMINATE_SCHEMA,
        schema_name="eliminate_words",
    )
    known = [w for ws in attributes.values() for w in ws]
    picked = {" ".join(w.lower().split()) for w in answer["eliminate"]}
    dropped = picked - set(known)
    if dropped:
        log.warning("VLM named words that are not in the attribute dictionary (ignored): %s", sorted(dropped))
    terms = _prompt_terms(prompt)
    return [w for w in known if w in picked and w not in terms]
