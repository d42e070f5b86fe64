"""Textual Attribute Substitution (paper §3.4, Eq. 9) and the offline choice of words to eliminate.

TAS removes from the prompt embedding the component that points along the embedding of the
subject's *original* attribute ("red" for a red can that the user wants blue), so that the
identifier ``sks`` — which absorbed the training images' red during fine-tuning — stops pulling the
result back to red:

    p_dec = p_raw - (p_raw · p_eli / ||p_eli||²) p_eli                                    (Eq. 9)

(the paper writes the two divisions by ``||p_eli||`` separately; it is the same thing). Vectors
live on the last dimension; everything else broadcasts, so one call handles a batch of token
sequences. Applied (DESIGN.md §3) to every prompt token of the concatenated SDXL token embeddings
(2 × CLIP penultimate states, 2048-d) and to the pooled embedding; the negative prompt is left alone.

With several eliminated tokens the public reference code projects them out one after another,
which leaves the result *not* orthogonal to the earlier ones when they are correlated (CLIP token
embeddings always are). Here the eliminated directions are first made orthonormal (Gram–Schmidt),
so the result is orthogonal to every one of them; with a single token both are Eq. 9 exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from dreammix.errors import DreamMixError

IDENTIFIER = "sks"


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: bf16 dot products over 2048 dims lose the
    small remainders that Eq. 9 is about."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def orthogonal_decompose(p_raw: torch.Tensor, p_eli: torch.Tensor) -> torch.Tensor:
    """Eq. 9: the part of ``p_raw`` orthogonal to ``p_eli`` (vectors on the last dim, broadcast).

    ``p_eli`` of zero norm removes nothing (there is no direction to remove). The result has the
    dtype of ``p_raw`` and the broadcast shape of both inputs.
    """
    dtype = _compute_dtype(p_raw, p_eli)
    raw, eli = p_raw.to(dtype), p_eli.to(dtype)
    norm2 = (eli * eli).sum(dim=-1, keepdim=True)
    coeff = (raw * eli).sum(dim=-1, keepdim=True) / torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
    coeff = torch.where(norm2 > 0, coeff, torch.zeros_like(coeff))
    return (raw - coeff * eli).to(p_raw.dtype)


def orthonormal_basis(vectors: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Gram–Schmidt on the rows of ``vectors`` (m, D) → (k, D) orthonormal rows spanning them
    (k ≤ m; rows that are (numerically) in the span of earlier ones are dropped)."""
    dtype = _compute_dtype(vectors)
    basis: list[torch.Tensor] = []
    for v in vectors.to(dtype):
        scale = v.norm()
        for b in basis:
            v = v - (v @ b) * b
        n = v.norm()
        if scale > 0 and n > rtol * scale:
            basis.append(v / n)
    if not basis:
        return vectors.new_zeros((0, vectors.shape[-1]), dtype=dtype)
    return torch.stack(basis)


def project_out(p_raw: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Remove the span of ``directions`` (m, D) from ``p_raw`` (..., D): Eq. 9 once per
    orthonormalised direction, so the result is orthogonal to every given direction."""
    basis = orthonormal_basis(directions)
    out = p_raw.to(_compute_dtype(p_raw, directions))
    for b in basis:
        out = orthogonal_decompose(out, b)
    return out.to(p_raw.dtype)


def decompose_prompt_embeds(
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    eliminate_embeds: torch.Tensor,
    eliminate_pooled: torch.Tensor,
    num_prompt_tokens: int,
    num_eliminate_tokens: int,
    eliminate_start: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply TAS to an SDXL prompt encoding.

    ``prompt_embeds`` (B, L, D) and ``eliminate_embeds`` (1, L, D) are the concatenated token
    embeddings of the prompt and of the eliminated words, both starting with the BOS token, so
    the prompt's words sit at positions ``1 … num_prompt_tokens`` and the eliminated words at
    ``1 … num_eliminate_tokens``. Each prompt token loses its components along the eliminated
    tokens' embeddings; BOS, EOS and padding keep theirs (they carry no attribute and the
    reference code skips them too). The pooled embedding loses its component along the
    eliminated words' pooled embedding (Eq. 9 once). ``eliminate_start`` > 1: the words were
    encoded after a context (``sampler.tas_context``) and sit at ``eliminate_start …``.
    """
    n_p = max(0, min(num_prompt_tokens, prompt_embeds.shape[1] - 2))
    n_e = max(0, min(num_eliminate_tokens, eliminate_embeds.shape[1] - 1 - eliminate_start))
    if n_e == 0 or n_p == 0:
        return prompt_embeds, pooled_embeds
    directions = eliminate_embeds[0, eliminate_start : eliminate_start + n_e]
    out = prompt_embeds.clone()
    out[:, 1 : 1 + n_p] = project_out(prompt_embeds[:, 1 : 1 + n_p], directions)
    pooled = orthogonal_decompose(pooled_embeds, eliminate_pooled.reshape(1, -1))
    return out, pooled


def count_text_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` between BOS and EOS (capped at the tokenizer's window)."""
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return max(0, len(ids) - 2)


def words_of(text: str) -> list[str]:
    """Lower-case words of a prompt (punctuation dropped)."""
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower())


def check_identifier(prompt: str, identifier: str = IDENTIFIER) -> None:
    """TAS decouples the attributes bound to the identifier; without it there is nothing to decouple."""
    if identifier not in words_of(prompt):
        raise DreamMixError(
            f"prompt {prompt!r} has no {identifier!r} identifier; TAS needs it (add it, or set tas.enabled=false)",
            "prompt",
        )


def clean_eliminate_words(words: Iterable[str] | None, identifier: str = IDENTIFIER) -> list[str]:
    """Strip, drop empties and duplicates; the identifier itself can never be eliminated."""
    out: list[str] = []
    for word in words or []:
        if not isinstance(word, str):
            raise DreamMixError(f"eliminate words must be strings, got {word!r}", "tas.eliminate")
        word = " ".join(word.split())
        if not word:
            continue
        if identifier in words_of(word):
            raise DreamMixError(f"cannot eliminate the identifier {identifier!r}", "tas.eliminate")
        if word not in out:
            out.append(word)
    return out


# --- Offline attribute selection -------------------------------------------------------------
# The paper asks a VLM which dictionary attributes the user's prompt replaces. Offline, a small
# lexicon tells which *category* a prompt word belongs to; the words to eliminate are then the
# subject's dictionary words of that category (its original colour when the prompt asks for a new
# colour, …). The ADM/VLM code can replace this rule; the function signature stays.

_CATEGORY_ALIASES = {
    "colour": "color",
    "colors": "color",
    "colours": "color",
    "materials": "material",
    "shapes": "shape",
    "patterns": "pattern",
    "textures": "texture",
    "styles": "style",
    "sizes": "size",
    "finish": "texture",
}

ATTRIBUTE_LEXICON: dict[str, frozenset[str]] = {
    "color": frozenset(
        "red orange yellow green blue purple violet pink brown black white gray grey silver gold golden "
        "beige cyan magenta teal turquoise navy maroon crimson scarlet ivory cream tan khaki olive lime "
        "lavender indigo bronze copper rainbow colorful multicolored".split()
    ),
    "material": frozenset(
        "wooden wood metal metallic steel iron aluminum aluminium glass plastic paper cardboard ceramic "
        "porcelain stone marble leather fabric cloth cotton wool woolen silk denim velvet plush furry "
        "rubber clay concrete gold golden silver bronze copper crystal ice chocolate knitted".split()
    ),
    "shape": frozenset(
        "round square rectangular cylindrical spherical cubic triangular oval circular flat tall short "
        "curved pointed conical hexagonal heart-shaped star-shaped".split()
    ),
    "pattern": frozenset(
        "striped stripes dotted polka spotted checkered plaid floral camouflage zebra leopard "
        "patterned plain".split()
    ),
    "texture": frozenset("shiny glossy matte smooth rough fluffy fuzzy sparkly glittery transparent".split()),
    "style": frozenset("cartoon realistic vintage retro modern futuristic minimalist steampunk origami".split()),
    "size": frozenset("big small tiny huge giant large miniature".split()),
}


def _canonical_category(category: str) -> str:
    key = category.strip().lower().replace("_", " ")
    return _CATEGORY_ALIASES.get(key, key)


def select_eliminate_words(prompt: str, attributes: Mapping[str, Iterable[str]]) -> list[str]:
    """The dictionary words of the same category as the prompt's *new* attribute word.

    ``attributes`` is the subject's attribute dictionary from ADM, ``{category: [words]}``
    (e.g. ``{"color": ["red", "silver"], "material": ["aluminum"]}``). A prompt word is a new
    attribute of a category when the lexicon puts it in that category and the dictionary does not
    lists nowhere (``"a sks blue can"`` → ``blue`` is a new color → eliminate ``red``,
    ``silver``). Dictionary entries that appear in the prompt are kept (the user asked for them).
    Categories unknown to the lexicon are matched only by the dictionary's own words, so they
    never trigger. Returns words in dictionary order, without duplicates.
    """
    prompt_words = set(words_of(prompt))
    dictionary = {str(c): [entries] if isinstance(entries, str) else [str(e) for e in entries] for c, entries in attributes.items()}
    # a word the dictionary lists anywhere describes the subject already: it is never "new"
    known = {w for entries in dictionary.values() for e in entries for w in words_of(e)}
    selected: list[str] = []
    for category, entries in dictionary.items():
        lexicon = ATTRIBUTE_LEXICON.get(_canonical_category(category), frozenset())
        new_words = (prompt_words & lexicon) - known
        if not new_words:
            continue
        for entry in entries:
            if not set(words_of(entry)) & prompt_words and entry not in selected:
                selected.append(entry)
    return selected
