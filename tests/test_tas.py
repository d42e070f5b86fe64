"""TAS (paper Eq. 9): orthogonal decomposition, its use on SDXL prompt embeddings, word selection."""

import numpy as np
import pytest
import torch

from dreammix.errors import DreamMixError
from dreammix.tas import (
    check_identifier,
    clean_eliminate_words,
    count_text_tokens,
    decompose_prompt_embeds,
    orthogonal_decompose,
    orthonormal_basis,
    project_out,
    select_eliminate_words,
)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_hand_computed_values():
    # (2, 1) minus its projection on (1, 1): coefficient 3/2 -> (0.5, -0.5)
    out = orthogonal_decompose(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(out, torch.tensor([0.5, -0.5]))
    out = orthogonal_decompose(torch.tensor([3.0, 4.0]), torch.tensor([2.0, 0.0]))
    assert torch.allclose(out, torch.tensor([0.0, 4.0]))
    # a direction shorter than 1 is divided by its own ||p_eli||², not by 1: coefficient 1.5/0.25 = 6
    out = orthogonal_decompose(torch.tensor([3.0, 4.0]), torch.tensor([0.5, 0.0]))
    assert torch.allclose(out, torch.tensor([0.0, 4.0]))


def test_output_is_orthogonal_to_p_eli_per_vector():
    g = torch.Generator().manual_seed(0)
    p_raw, p_eli = torch.randn(3, 7, 64, generator=g), torch.randn(64, generator=g)
    out = orthogonal_decompose(p_raw, p_eli)
    assert _cos(out, p_eli.expand_as(out)).abs().max() < 1e-5
    # what is removed is along p_eli: the remainder p_raw - out is parallel to it
    assert torch.allclose(_cos(p_raw - out, p_eli.expand_as(out)).abs(), torch.ones(3, 7, dtype=torch.float64), atol=1e-5)


def test_idempotent_and_unchanged_when_already_orthogonal():
    g = torch.Generator().manual_seed(1)
    p_raw, p_eli = torch.randn(5, 32, generator=g), torch.randn(32, generator=g)
    once = orthogonal_decompose(p_raw, p_eli)
    assert torch.allclose(orthogonal_decompose(once, p_eli), once, atol=1e-6)
    orth = torch.tensor([0.0, 2.0, -3.0])
    assert torch.equal(orthogonal_decompose(orth, torch.tensor([5.0, 0.0, 0.0])), orth)


def test_zero_when_parallel_and_noop_for_zero_direction():
    p_eli = torch.tensor([0.3, -1.2, 2.0, 0.7])
    assert torch.allclose(orthogonal_decompose(-2.5 * p_eli, p_eli), torch.zeros(4), atol=1e-6)
    p_raw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(orthogonal_decompose(p_raw, torch.zeros(4)), p_raw)
    # ... also to first order: d out / d p_raw is the identity, not a NaN from the 0/0 of Eq. 9
    p_raw.requires_grad_(True)
    (grad,) = torch.autograd.grad(orthogonal_decompose(p_raw, torch.zeros(4)).sum(), p_raw)
    assert torch.equal(grad, torch.ones(4))


def test_shapes_broadcast_over_batch_and_tokens():
    g = torch.Generator().manual_seed(2)
    p_raw = torch.randn(2, 5, 16, generator=g)
    per_token = torch.randn(1, 5, 16, generator=g)  # one direction per token, shared over the batch
    per_batch = torch.randn(2, 1, 16, generator=g)  # one direction per sample, shared over tokens
    for p_eli in (per_token, per_batch, per_batch[0, 0]):
        out = orthogonal_decompose(p_raw, p_eli)
        assert out.shape == p_raw.shape
        full = p_eli.expand_as(p_raw)
        for b in range(2):
            for t in range(5):
                expected = orthogonal_decompose(p_raw[b, t], full[b, t])
                assert torch.allclose(out[b, t], expected, atol=1e-6)


def _remainder_f64(p_raw: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Independent reference: p - Q Qᵀ p in float64, Q an orthonormal basis of the directions (numpy QR)."""
    q, _ = np.linalg.qr(directions.double().numpy().T)
    p = p_raw.double().numpy()
    return torch.from_numpy(p - (p @ q) @ q.T)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((x.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()


def test_dtype_is_kept_and_bf16_is_computed_in_fp32():
    """bf16 prompt embeddings (SDXL in bf16) must not lose Eq. 9's small remainder: p_raw almost
    parallel to p_eli makes ``p_raw - c·p_eli`` a catastrophic cancellation, which in bf16 leaves
    ~10 % error; computed in fp32 and rounded once, the result is the float64 answer rounded to bf16."""
    g = torch.Generator().manual_seed(3)
    d, small = torch.randn(2, 2048, generator=g), 0.05 * torch.randn(8, 2048, generator=g)
    dirs = d.bfloat16()
    rounding = 2.0**-8  # bf16 relative rounding of one value
    p_raw = (3.0 * d[0] + small).bfloat16()
    # the inputs do separate the two: Eq. 9 evaluated in bf16 by hand is far off
    e = dirs[0]
    in_bf16 = p_raw - ((p_raw * e).sum(-1, keepdim=True) / (e * e).sum(-1, keepdim=True)) * e
    ref = _remainder_f64(p_raw, dirs[:1])
    assert _rel_err(in_bf16, ref) > 10 * rounding
    out = orthogonal_decompose(p_raw, e)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < 1.5 * rounding
    # several directions: the running result stays fp32 between the projections (rounding it
    # to bf16 after removing d0 leaves an error as large as the remainder after removing d1)
    p_raw = (3.0 * d[0] + 2.0 * d[1] + small).bfloat16()
    out = project_out(p_raw, dirs)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, _remainder_f64(p_raw, dirs)) < 1.5 * rounding


def test_float64_inputs_keep_float64_precision():
    """Removing a coordinate axis is exact arithmetic: the coordinate becomes 0 and the others
    keep every bit. A float64 prompt (or float64 directions) must therefore come back exactly
    like that, even when the other argument is float32: nothing may pass through float32."""
    g = torch.Generator().manual_seed(6)
    p_raw = torch.randn(3, 8, generator=g, dtype=torch.float64)  # values with bits beyond float32
    expected = p_raw.clone()
    expected[:, 1] = 0.0
    axis = torch.zeros(8, dtype=torch.float64)
    axis[1] = 2.0  # a power of two: ||p_eli||² = 4 and the coefficient p/2 are exact
    for p_eli in (axis, axis.float()):
        out = orthogonal_decompose(p_raw, p_eli)
        assert out.dtype == torch.float64 and torch.equal(out, expected)
    for directions in (axis[None], axis[None].float()):
        out = project_out(p_raw, directions)
        assert out.dtype == torch.float64 and torch.equal(out, expected)


def test_fp32_prompt_with_fp64_directions_is_computed_in_fp64():
    """The mirror case: fp32 p_raw, fp64 directions. Eq. 9 (and the running result between
    projections) is evaluated in fp64 and rounded to fp32 once, so the result is the fp64 answer
    to fp32 rounding, although p_raw almost parallel to the directions makes it a cancellation
    that costs ~10⁻⁴ relative error in fp32."""
    g = torch.Generator().manual_seed(7)
    d = torch.randn(2, 256, generator=g, dtype=torch.float64)
    small = 1e-3 * torch.randn(4, 256, generator=g, dtype=torch.float64)
    rounding = 2.0**-24  # fp32 relative rounding of one value
    p_raw = (3.0 * d[0] + small).float()
    ref = _remainder_f64(p_raw, d[:1])
    e = d[0].float()  # the inputs do separate fp32 from fp64 evaluation:
    in_fp32 = p_raw - ((p_raw * e).sum(-1, keepdim=True) / (e * e).sum(-1, keepdim=True)) * e
    assert _rel_err(in_fp32, ref) > 100 * rounding
    out = orthogonal_decompose(p_raw, d[0])
    assert out.dtype == torch.float32
    assert _rel_err(out, ref) < 2 * rounding
    p_raw = (3.0 * d[0] + 2.0 * d[1] + small).float()
    out = project_out(p_raw, d)
    assert out.dtype == torch.float32
    assert _rel_err(out, _remainder_f64(p_raw, d)) < 2 * rounding


def _projector_f64(vectors: torch.Tensor) -> np.ndarray:
    """Orthogonal projector onto the row span of independent ``vectors`` (numpy QR, float64)."""
    q, _ = np.linalg.qr(vectors.double().numpy().T)
    return q @ q.T


def test_orthonormal_basis_spans_the_directions_and_drops_dependent_ones():
    """Gram–Schmidt result: k = rank orthonormal rows whose projector is the span's projector.
    Rows in the span of earlier ones (a repeat, a linear combination) and zero rows add nothing,
    for any overall scale of the embeddings (CLIP token embeddings have norms of tens)."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 16, generator=g)
    for scale in (1e-3, 1.0, 1e2):
        vectors = scale * torch.stack([a, torch.zeros(16), b, 2.0 * a - 3.0 * b, a])
        basis = orthonormal_basis(vectors)
        assert basis.shape == (2, 16)
        assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
        assert np.allclose(basis.double().numpy().T @ basis.double().numpy(), _projector_f64(torch.stack([a, b])), atol=1e-5)
    # bf16 embeddings are orthonormalised in fp32 (to fp32 accuracy, not bf16's 2⁻⁸); fp64 stays fp64
    vectors = torch.stack([a, a + 0.1 * b]).bfloat16()
    basis = orthonormal_basis(vectors)
    assert basis.dtype == torch.float32 and torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
    assert orthonormal_basis(vectors.float()).dtype == torch.float32
    assert orthonormal_basis(vectors.double()).dtype == torch.float64
    # nothing to span: an empty (0, D) basis, and project_out removes nothing
    for zeros in (torch.zeros(3, 5), torch.zeros(3, 5, dtype=torch.bfloat16)):
        basis = orthonormal_basis(zeros)
        assert basis.shape == (0, 5) and basis.dtype == torch.float32
    p_raw = torch.randn(2, 5, generator=g)
    assert torch.equal(project_out(p_raw, torch.zeros(3, 5)), p_raw)


def test_project_out_is_orthogonal_to_every_direction():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(16, generator=g)
    directions = torch.stack([base + 0.1 * torch.randn(16, generator=g) for _ in range(3)])  # correlated
    p_raw = torch.randn(6, 16, generator=g)
    out = project_out(p_raw, directions)
    for d in directions:
        assert _cos(out, d.expand_as(out)).abs().max() < 1e-5
    # one direction: exactly Eq. 9
    assert torch.allclose(project_out(p_raw, directions[:1]), orthogonal_decompose(p_raw, directions[0]), atol=1e-6)


def test_decompose_prompt_embeds_touches_only_prompt_tokens():
    g = torch.Generator().manual_seed(5)
    prompt, pooled = torch.randn(2, 10, 8, generator=g), torch.randn(2, 6, generator=g)
    eli, eli_pooled = torch.randn(1, 10, 8, generator=g), torch.randn(1, 6, generator=g)
    out, out_pooled = decompose_prompt_embeds(prompt, pooled, eli, eli_pooled, num_prompt_tokens=4, num_eliminate_tokens=2)
    assert torch.equal(out[:, 0], prompt[:, 0])  # BOS
    assert torch.equal(out[:, 5:], prompt[:, 5:])  # EOS + padding
    for j in (1, 2):  # eliminated words sit at positions 1..2 of their encoding
        assert _cos(out[:, 1:5], eli[0, j].expand(2, 4, 8)).abs().max() < 1e-5
    assert _cos(out_pooled, eli_pooled.expand(2, 6)).abs().max() < 1e-5
    # and they are exactly the part orthogonal to those directions (not, e.g., zeroed tokens)
    expected = _remainder_f64(prompt[:, 1:5].reshape(-1, 8), eli[0, 1:3]).reshape(2, 4, 8)
    assert torch.allclose(out[:, 1:5].double(), expected, atol=1e-5)
    assert torch.allclose(out_pooled.double(), _remainder_f64(pooled, eli_pooled), atol=1e-5)
    same, same_pooled = decompose_prompt_embeds(prompt, pooled, eli, eli_pooled, 4, 0)
    assert same is prompt and same_pooled is pooled


def test_decompose_prompt_embeds_token_counts_are_capped_at_the_window():
    """The counts come from the tokenizer; the BOS (first) and the last position of the window are
    never prompt/eliminated words: a count beyond the window is capped at L - 2, a count of 0
    leaves everything alone, a count of 1 still decomposes that one token."""
    g = torch.Generator().manual_seed(9)
    L, D = 6, 16
    prompt, pooled = torch.randn(2, L, D, generator=g), torch.randn(2, 4, generator=g)
    eli, eli_pooled = torch.randn(1, L, D, generator=g), torch.randn(1, 4, generator=g)
    out, out_pooled = decompose_prompt_embeds(prompt, pooled, eli, eli_pooled, 100, 100)
    assert torch.equal(out[:, 0], prompt[:, 0]) and torch.equal(out[:, L - 1], prompt[:, L - 1])
    expected = _remainder_f64(prompt[:, 1 : L - 1].reshape(-1, D), eli[0, 1 : L - 1]).reshape(2, L - 2, D)
    assert torch.allclose(out[:, 1 : L - 1].double(), expected, atol=1e-5)
    assert torch.allclose(out_pooled.double(), _remainder_f64(pooled, eli_pooled), atol=1e-5)
    # one prompt token, one eliminated word
    out, _ = decompose_prompt_embeds(prompt, pooled, eli, eli_pooled, 1, 1)
    assert torch.allclose(out[:, 1].double(), _remainder_f64(prompt[:, 1], eli[0, 1:2]), atol=1e-5)
    assert torch.equal(out[:, 2:], prompt[:, 2:]) and torch.equal(out[:, 0], prompt[:, 0])
    # an empty prompt has no word to decompose
    same, same_pooled = decompose_prompt_embeds(prompt, pooled, eli, eli_pooled, 0, 2)
    assert torch.equal(same, prompt) and torch.equal(same_pooled, pooled)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from dreammix.models.tiny import sdxl_tokenizers

    return sdxl_tokenizers()[0]


def test_count_text_tokens_counts_words_between_bos_and_eos(tiny_tokenizer):
    """The tiny CLIP vocabulary has one token for each of a few words (a, sks, red, can, …) and
    one per byte otherwise; the count excludes BOS/EOS and is capped at the 77-token window."""
    assert count_text_tokens(tiny_tokenizer, "a sks red can") == 4
    assert count_text_tokens(tiny_tokenizer, "red silver") == 1 + len("silver")
    assert count_text_tokens(tiny_tokenizer, "") == 0
    assert count_text_tokens(tiny_tokenizer, "a " * 100) == 77 - 2


def test_select_eliminate_words_same_category_rule():
    attributes = {
        "color": ["red", "silver"],
        "material": ["aluminum"],
        "shape": ["cylindrical"],
        "accessories": ["pull tab"],
    }
    assert select_eliminate_words("a sks blue can", attributes) == ["red", "silver"]
    assert select_eliminate_words("a sks wooden can on a table", attributes) == ["aluminum"]
    assert select_eliminate_words("a sks blue wooden can", attributes) == ["red", "silver", "aluminum"]
    # words the dictionary already has are not new attributes; the user keeps them
    assert select_eliminate_words("a sks red can", attributes) == []
    assert select_eliminate_words("a sks silver and green can", attributes) == ["red"]
    assert select_eliminate_words("a photo of sks can", attributes) == []
    assert select_eliminate_words("a sks green can", {"Colour": ["red"]}) == ["red"]
    # a single entry given as a plain string is one word, not a sequence of letters
    assert select_eliminate_words("a sks green can", {"color": "red"}) == ["red"]


def test_identifier_and_word_checks():
    check_identifier("a sks red can")
    with pytest.raises(DreamMixError, match="sks") as err:
        check_identifier("a red can")
    assert "\n" not in str(err.value) and err.value.where == "prompt"
    assert clean_eliminate_words([" red ", "red", "", "metallic  silver"]) == ["red", "metallic silver"]
    with pytest.raises(DreamMixError, match="identifier"):
        clean_eliminate_words(["sks"])
