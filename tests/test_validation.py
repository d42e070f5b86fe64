"""Validation panels on the tiny model: identity and attribute-edit prompts on held-out scenes,
rendered with DreamMixInpaintPipeline (DIF + TAS) from conditions encoded once, labelled."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dreammix.errors import DreamMixError
from dreammix.pipeline import DreamMixInpaintPipeline
from dreammix.validation_panels import ValidationCallback, ValidationSpec, load_backgrounds, tas_words

PROMPTS = ("a photo of sks thing", "a red sks thing")
ATTRIBUTES = {"color": ["blue", "silver"], "material": ["metal"]}


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from dreammix.models.loading import ModelSpec, load_pipeline

    base = load_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
    return DreamMixInpaintPipeline.from_base(base)


def _scenes(folder, sizes=((96, 80), (70, 70))):
    (folder / "masks").mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (30 + 100 * i, 90, 160)).save(folder / f"scene{i}.jpg")
    mask = Image.new("L", sizes[0], 0)
    mask.paste(255, (10, 10, 40, 30))
    mask.save(folder / "masks" / "scene0.png")
    return folder


def test_backgrounds_are_square_at_resolution_with_their_masks_or_a_centre_box(tmp_path):
    scenes = load_backgrounds(_scenes(tmp_path / "bg"), count=5, resolution=64)
    assert [b.name for b in scenes] == ["scene0", "scene1"]
    assert all(b.image.size == (64, 64) and b.mask.size == (64, 64) for b in scenes)
    # scene0: 96x80 → centre 80x80 crop from x=8, scaled by 64/80: box (10,10,40,30) → (1.6,8,25.6,24)
    m0 = np.asarray(scenes[0].mask) > 127
    assert m0[8:24, 2:25].all() and not m0[:7].any() and not m0[:, 27:].any()
    m1 = np.asarray(scenes[1].mask) > 127  # no mask file: the centred half-side box
    assert m1.sum() == 32 * 32 and m1[16:48, 16:48].all()


def test_tas_words_only_for_attribute_edits():
    assert tas_words(PROMPTS, ATTRIBUTES, enabled=True) == {PROMPTS[0]: [], PROMPTS[1]: ["blue", "silver"]}
    assert tas_words(PROMPTS, ATTRIBUTES, enabled=False) == {p: [] for p in PROMPTS}
    assert tas_words(PROMPTS, None, enabled=True) == {p: [] for p in PROMPTS}


def test_spec_refuses_bad_values(tmp_path):
    val = dict(every_n_steps=5, prompts=list(PROMPTS), backgrounds=None, num_samples=2, num_inference_steps=2,
               guidance_scale=5.0, lambda_=0.7, tas=True)
    cfg = lambda **kw: SimpleNamespace(**{**val, **kw}, get=lambda k, d=None: {**val, **kw}.get(k, d))  # noqa: E731
    with pytest.raises(DreamMixError, match="validation.prompts"):
        ValidationSpec.from_config(cfg(prompts=[]), None, 0)
    with pytest.raises(DreamMixError, match="validation.lambda_"):
        ValidationSpec.from_config(cfg(lambda_=1.5), None, 0)
    with pytest.raises(DreamMixError, match="validation.backgrounds"):
        ValidationSpec.from_config(cfg(backgrounds=str(tmp_path / "none")), None, 0)
    assert ValidationSpec.from_config(cfg(), tmp_path, 0).backgrounds == tmp_path  # default folder when present
    assert ValidationSpec.from_config(cfg(), tmp_path / "none", 0).backgrounds is None


def test_render_calls_dreammix_pipeline_per_scene_and_prompt_with_labels(pipe, tmp_path, monkeypatch, one_thread):
    spec = ValidationSpec(every_n_steps=2, prompts=PROMPTS, backgrounds=None, num_backgrounds=2,
                          num_inference_steps=2, guidance_scale=5.0, lambda_=0.5, tas=True)
    scenes = load_backgrounds(_scenes(tmp_path / "bg"), 2, 64)
    words = tas_words(PROMPTS, ATTRIBUTES, enabled=True)
    text_calls = []
    hooks = [te.register_forward_hook(lambda *a: text_calls.append(1)) for te in (pipe.text_encoder, pipe.text_encoder_2)]
    callback = ValidationCallback(pipe, spec, scenes, words, tmp_path / "samples")
    assert text_calls  # the conditions were encoded here, once per prompt ...
    text_calls.clear()

    calls = []
    original = DreamMixInpaintPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DreamMixInpaintPipeline, "__call__", counted)
    module = torch.nn.Linear(1, 1)
    trainer = SimpleNamespace(global_step=1, loggers=[], is_global_zero=True)
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert not calls and not (tmp_path / "samples").exists()  # not a validation step
    other_rank = SimpleNamespace(global_step=2, loggers=[], is_global_zero=False)
    callback.on_train_batch_end(other_rank, module, None, None, 1)
    assert not calls and not (tmp_path / "samples").exists()  # DDP: only rank 0 renders and writes
    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, None, None, 1)
    callback.on_train_batch_end(trainer, module, None, None, 2)  # the same optimizer step: no second render
    for hook in hooks:
        hook.remove()

    assert len(calls) == 4 and not text_calls  # ... and no text encoder ran while rendering
    assert [(c["prompt"], c["eliminate"], c["lambda_"]) for c in calls] == [
        (PROMPTS[0], [], 0.5), (PROMPTS[1], ["blue", "silver"], 0.5)] * 2
    assert all(c["conditions"] is callback.conditions[c["prompt"]] for c in calls)
    assert [c["image"] for c in calls] == [scenes[0].image, scenes[0].image, scenes[1].image, scenes[1].image]

    grid = Image.open(tmp_path / "samples" / "step_000002.png")
    grid_again, panels, captions = callback.render(2)
    assert len(panels) == 4 and all(p.size == (64, 64) for p in panels)
    assert captions == [
        "scene0 | a photo of sks thing | step 2 | λ=0.5 | TAS: -",
        "scene0 | a red sks thing | step 2 | λ=0.5 | TAS: blue, silver",
        "scene1 | a photo of sks thing | step 2 | λ=0.5 | TAS: -",
        "scene1 | a red sks thing | step 2 | λ=0.5 | TAS: blue, silver",
    ]
    # rows = scenes, columns = masked input + one per prompt, each panel with a label band below
    assert grid.size == grid_again.size == (3 * 64, 2 * (64 + 3 * 12 + 4))
    cell = np.asarray(grid)[: 64, 64:128]
    assert np.array_equal(cell, np.asarray(panels[0].convert("RGB")))  # the rendered image, unscaled
    band = np.asarray(grid)[64 : 64 + 40, 64:128]
    assert (band < 100).any() and (band == 255).mean() > 0.5  # dark text on a white band
