"""TAS (paper Eq. 9): orthogonal decomposition, its use on SDXL prompt embeddings, word selection."""

import numpy as np
import pytest
import torch

from dreammix.errors import DreamMixError
from dreammix.tas import (
    check_identifier,
    clean_eliminate_words,
    decompose_prompt_embeds,
    orthogonal_decompose,
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


def test_identifier_and_word_checks():
    check_identifier("a sks red can")
    with pytest.raises(DreamMixError, match="sks") as err:
        check_identifier("a red can")
    assert "\n" not in str(err.value) and err.value.where == "prompt"
    assert clean_eliminate_words([" red ", "red", "", "metallic  silver"]) == ["red", "metallic silver"]
    with pytest.raises(DreamMixError, match="identifier"):
        clean_eliminate_words(["sks"])
