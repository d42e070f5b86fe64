"""The Fooocus base: patch file reading, key mapping, patching, the inpaint head, LoRA, loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dreammix.errors import DreamMixError
from dreammix.models.fooocus import (
    FooocusConvIn,
    FooocusInpaintHead,
    FooocusSpec,
    apply_fooocus_patch,
    attach_fooocus_head,
    build_tiny_fooocus,
    is_fooocus_unet,
    load_fooocus_components,
    load_fooocus_patch,
    map_patch_keys_to_diffusers,
    synthetic_fooocus_patch,
)


@pytest.fixture(scope="module")
def tiny_base():
    """The tiny SDXL base pipeline (4-channel UNet), in memory."""
    return build_tiny_fooocus(seed=0)


@pytest.fixture
def unet(tiny_base):
    return copy.deepcopy(tiny_base.unet).eval()


def _unet_inputs(unet, batch=2, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    latents = torch.randn(batch, 4, size, size, generator=gen)
    mask = (torch.rand(batch, 1, size, size, generator=gen) > 0.5).float()
    masked = torch.randn(batch, 4, size, size, generator=gen)
    text = torch.randn(batch, 5, cfg.cross_attention_dim, generator=gen)
    pooled = torch.randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=gen)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
    cond = {"encoder_hidden_states": text, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    return latents, mask, masked, torch.tensor([500, 20]), cond


# ---------------------------------------------------------------------------------- patch file


def test_dequantization_matches_hand_computed_values(tmp_path):
    path = tmp_path / "p.patch"
    torch.save(
        {
            # per-tensor min/max: 0 → -1, 51 → -1 + 0.2 * 2 = -0.6, 255 → 1
            "diffusion_model.a.weight": (torch.tensor([0, 51, 255], dtype=torch.uint8), torch.tensor(-1.0), torch.tensor(1.0)),
            # per-row min/max (keep-dim), stored in fp16 as a quantizer might: row 0 in [0, 0.5], row 1 in [-2, 0]
            "diffusion_model.b.weight": (
                torch.tensor([[0, 255], [102, 255]], dtype=torch.uint8),
                torch.tensor([[0.0], [-2.0]], dtype=torch.float16),
                torch.tensor([[0.5], [0.0]], dtype=torch.float16),
            ),
            # a plain float delta is taken as is
            "diffusion_model.c.bias": torch.tensor([0.25, -0.125]),
        },
        path,
    )
    deltas = load_fooocus_patch(path)
    assert torch.allclose(deltas["diffusion_model.a.weight"], torch.tensor([-1.0, -0.6, 1.0]), atol=1e-6)
    assert torch.allclose(deltas["diffusion_model.b.weight"], torch.tensor([[0.0, 0.5], [-1.2, 0.0]]), atol=1e-6)
    assert torch.equal(deltas["diffusion_model.c.bias"], torch.tensor([0.25, -0.125]))
    assert all(d.dtype == torch.float32 for d in deltas.values())


@pytest.mark.parametrize(
    "entry, message",
    [
        ((torch.zeros(3), torch.tensor(0.0), torch.tensor(1.0)), "uint8"),
        ((torch.zeros(3, dtype=torch.uint8), torch.tensor(0.0)), "triple"),
        ((torch.zeros(3, dtype=torch.uint8), torch.zeros(4), torch.ones(4)), "broadcast"),
        ((torch.zeros(3, dtype=torch.uint8), torch.zeros(2, 3), torch.ones(2, 3)), "enlarge"),
        (torch.zeros(3, dtype=torch.int64), "float"),
        ("not a tensor", "triple"),
    ],
)
def test_malformed_patch_entry_names_file_and_key(tmp_path, entry, message):
    path = tmp_path / "bad.patch"
    torch.save({"diffusion_model.out.2.weight": entry}, path)
    with pytest.raises(DreamMixError, match=message) as info:
        load_fooocus_patch(path)
    text = str(info.value)
    assert str(path) in text and "diffusion_model.out.2.weight" in text and "\n" not in text


def test_malformed_file_is_a_one_line_error(tmp_path):
    garbage = tmp_path / "inpaint_v26.fooocus.patch"
    garbage.write_bytes(b"\x00\x01 this is not a torch file" * 10)
    with pytest.raises(DreamMixError, match="not a readable torch file") as info:
        load_fooocus_patch(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)

    truncated = tmp_path / "truncated.patch"
    torch.save({"diffusion_model.out.2.bias": torch.zeros(4)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DreamMixError, match="not a readable torch file") as info:
        load_fooocus_patch(truncated)
    assert "\n" not in str(info.value)

    not_a_dict = tmp_path / "list.patch"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(DreamMixError, match="dict"):
        load_fooocus_patch(not_a_dict)

    with pytest.raises(DreamMixError, match="not found"):
        load_fooocus_patch(tmp_path / "missing.patch")


class _Exploit:
    """Unpickling this would call ``open(marker, "w")`` — weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_only_loading_refuses_arbitrary_pickles(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.patch"
    torch.save({"diffusion_model.out.2.weight": _Exploit(marker)}, path)
    with pytest.raises(DreamMixError, match="weights_only") as info:
        load_fooocus_patch(path)
    assert not marker.exists()
    assert "\n" not in str(info.value)
    head_path = tmp_path / "evil_head.pth"
    torch.save({"head": _Exploit(marker)}, head_path)
    with pytest.raises(DreamMixError, match="weights_only"):
        FooocusInpaintHead.from_file(head_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------- key mapping


def test_hand_picked_ldm_keys_map_to_diffusers_names(unet):
    """Expected names worked out by hand for the tiny UNet (layers_per_block=1, 2 levels).

    The subset skips whole blocks and has a bias without its weight: diffusers' converter counts
    blocks rather than taking the highest index, so this checks the compensation too.
    """
    expected = {
        "diffusion_model.output_blocks.3.0.in_layers.2.weight": "up_blocks.1.resnets.1.conv1.weight",
        "diffusion_model.output_blocks.3.0.skip_connection.weight": "up_blocks.1.resnets.1.conv_shortcut.weight",
        "diffusion_model.output_blocks.1.2.conv.bias": "up_blocks.0.upsamplers.0.conv.bias",
        "diffusion_model.output_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight",
        "diffusion_model.input_blocks.2.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.middle_block.2.emb_layers.1.bias": "mid_block.resnets.1.time_emb_proj.bias",
        "diffusion_model.middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        "diffusion_model.label_emb.0.2.weight": "add_embedding.linear_2.weight",
        "diffusion_model.time_embed.0.bias": "time_embedding.linear_1.bias",
        "diffusion_model.input_blocks.0.0.weight": "conv_in.weight",
        "diffusion_model.out.2.bias": "conv_out.bias",
    }
    patch = {k: torch.zeros(1) for k in expected}
    mapped = map_patch_keys_to_diffusers(patch, unet.config, unet.state_dict().keys())
    assert sorted(mapped) == sorted(expected.values())


def test_synthetic_patch_maps_every_key_and_changes_exactly_the_patched_weights(tmp_path, unet):
    raw = synthetic_fooocus_patch(unet, seed=3, every=3)  # every third weight: some stay untouched
    path = tmp_path / "inpaint_v26.fooocus.patch"
    torch.save(raw, path)
    deltas = load_fooocus_patch(path)
    assert set(deltas) == set(raw) and all(k.startswith("diffusion_model.") for k in raw)

    mapped = map_patch_keys_to_diffusers(deltas, unet.config, unet.state_dict().keys())
    assert len(mapped) == len(deltas)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    patched = apply_fooocus_patch(unet, mapped)
    after = unet.state_dict()

    assert 0 < len(patched) < len(before)
    for name, old in before.items():
        if name in mapped:
            assert torch.allclose(after[name], old + mapped[name], atol=1e-6), name
            assert not torch.equal(after[name], old), name
        else:
            assert torch.equal(after[name], old), name


def test_unknown_patch_keys_are_errors_not_skipped(unet):
    good = {"diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}
    # Not a UNet key at all (a text-encoder weight): the converter does not place it.
    foreign = {**good, "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32)}
    with pytest.raises(DreamMixError, match="final_layer_norm") as info:
        map_patch_keys_to_diffusers(foreign, unet.config)
    assert "1 Fooocus patch key" in str(info.value)
    # Renamed by the converter, but no such weight in this UNet (a patch for another model).
    bogus = {**good, "diffusion_model.input_blocks.1.0.bogus.weight": torch.zeros(1)}
    with pytest.raises(DreamMixError, match="bogus"):
        map_patch_keys_to_diffusers(bogus, unet.config, unet.state_dict().keys())
    # A block this UNet does not have.
    beyond = {**good, "diffusion_model.input_blocks.7.0.in_layers.0.weight": torch.zeros(1)}
    with pytest.raises(DreamMixError, match="input_blocks.7"):
        map_patch_keys_to_diffusers(beyond, unet.config, unet.state_dict().keys())


def test_bad_patch_leaves_the_unet_untouched(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    patch = {"conv_out.bias": torch.ones(4), "conv_out.weight": torch.ones(4, 32, 1, 1)}
    with pytest.raises(DreamMixError, match="shape mismatch"):
        apply_fooocus_patch(unet, patch)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


# ---------------------------------------------------------------------------------- the head


def _head_file(tmp_path, channels=32, seed=0):
    weight = torch.randn(channels, 5, 3, 3, generator=torch.Generator().manual_seed(seed)) * 0.1
    path = tmp_path / "fooocus_inpaint_head.pth"
    torch.save({"head": weight}, path)
    return path, weight


def test_head_is_replicate_padded_bias_free_conv(tmp_path):
    path, weight = _head_file(tmp_path)
    head = FooocusInpaintHead.from_file(path, out_channels=32)
    x = torch.randn(1, 5, 6, 6)
    out = head(x)
    assert out.shape == (1, 32, 6, 6)
    # Border pixels see the replicated edge, not zeros; the interior is a plain 3x3 conv.
    reference = torch.zeros(1, 32, 6, 6)
    padded = x[:, :, [0, 0, 1, 2, 3, 4, 5, 5]][:, :, :, [0, 0, 1, 2, 3, 4, 5, 5]]
    for i in range(6):
        for j in range(6):
            patch = padded[:, :, i : i + 3, j : j + 3]
            reference[:, :, i, j] = torch.einsum("bchw,ochw->bo", patch, weight)
    assert torch.allclose(out, reference, atol=1e-5)
    assert not torch.allclose(out, F.conv2d(x, weight, padding=1), atol=1e-5)


@pytest.mark.parametrize(
    "content, message",
    [({"head": torch.zeros(32, 9, 3, 3)}, r"\[C, 5, 3, 3\]"), ({"weight": torch.zeros(32, 5, 3, 3)}, "head"), ({"head": torch.zeros(320, 5, 3, 3)}, "320 output channels")],
)
def test_malformed_head_file(tmp_path, content, message):
    path = tmp_path / "fooocus_inpaint_head.pth"
    torch.save(content, path)
    with pytest.raises(DreamMixError, match=message):
        FooocusInpaintHead.from_file(path, out_channels=32)


def test_wrapped_unet_adds_the_head_to_conv_in(tmp_path, unet):
    path, weight = _head_file(tmp_path)
    plain = copy.deepcopy(unet)
    latents, mask, masked, t, cond = _unet_inputs(unet)
    feed = torch.cat([mask, masked], dim=1)

    wrapped = attach_fooocus_head(unet, FooocusInpaintHead.from_file(path))
    assert is_fooocus_unet(wrapped) and wrapped.config.in_channels == 9
    x9 = torch.cat([latents, mask, masked], dim=1)  # the SDXL-inpainting-0.1 calling convention
    with torch.no_grad():
        out = wrapped(x9, t, **cond).sample
        # conv_in(x) + head(cat(mask, masked latent)), added the way Fooocus's input block patch does.
        feature = F.conv2d(F.pad(feed, (1, 1, 1, 1), mode="replicate"), weight)
        hook = plain.conv_in.register_forward_hook(lambda _m, _i, output: output + feature)
        expected = plain(latents, t, **cond).sample
        hook.remove()
        without_head = plain(latents, t, **cond).sample

    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, without_head, atol=1e-3)
    with pytest.raises(ValueError, match="9 channels"):
        wrapped(latents, t, **cond)
    with pytest.raises(DreamMixError, match="already"):
        attach_fooocus_head(wrapped, FooocusInpaintHead(32))


def test_head_refuses_a_nine_channel_unet(tiny_base):
    from diffusers import UNet2DConditionModel

    nine = UNet2DConditionModel.from_config({**tiny_base.unet.config, "in_channels": 9})
    with pytest.raises(DreamMixError, match="sdxl_inpaint"):
        attach_fooocus_head(nine, FooocusInpaintHead(32))


def test_lora_attaches_and_trains_on_the_wrapped_unet(tmp_path, unet):
    from dreammix.models.lora import LoraSpec, add_lora, lora_state_dict

    path, _ = _head_file(tmp_path)
    wrapped = attach_fooocus_head(unet, FooocusInpaintHead.from_file(path))
    params = add_lora(wrapped, LoraSpec(rank=4, alpha=4.0))
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert params and len(names) == len(params)
    assert all("lora_" in n and (".to_k." in n or ".to_v." in n) for n in names)
    assert not any(p.requires_grad for p in wrapped.conv_in.parameters())

    latents, mask, masked, t, cond = _unet_inputs(wrapped)
    wrapped.train()
    pred = wrapped(torch.cat([latents, mask, masked], dim=1), t, **cond).sample
    F.mse_loss(pred, torch.randn_like(pred)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_B" in n)
    assert wrapped.conv_in.head.head.grad is None
    keys = list(lora_state_dict(wrapped))
    assert keys and all("conv_in" not in k for k in keys)


# ------------------------------------------------------------------------------ whole loading


def test_configs_compose(compose):
    real = FooocusSpec.from_config(compose("train", ["model=fooocus"]).model)
    assert real.pretrained == "frankjoshua/juggernautXL_v8Rundiffusion"
    assert (real.inpaint_repo, real.head_file, real.patch_file) == (
        "lllyasviel/fooocus_inpaint",
        "fooocus_inpaint_head.pth",
        "inpaint_v26.fooocus.patch",
    )
    assert (real.resolution, real.weight_dtype, real.vae_fp32, real.gradient_checkpointing, real.build_if_missing) == (
        1024,
        "auto",
        True,
        True,
        False,
    )
    tiny = FooocusSpec.from_config(compose("train", ["model=tiny_fooocus"]).model)
    assert tiny.build_if_missing and tiny.resolution == 64


def test_tiny_fooocus_loads_patches_and_inpaints(compose):
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image
    from safetensors.torch import load_file

    spec = FooocusSpec.from_config(compose("train", ["model=tiny_fooocus"]).model)
    pipe = load_fooocus_components(spec)
    assert isinstance(pipe, StableDiffusionXLInpaintPipeline)
    assert is_fooocus_unet(pipe.unet) and isinstance(pipe.unet.conv_in, FooocusConvIn)
    assert pipe.unet.config.in_channels == 9

    # Every weight of the tiny base is patched by its synthetic patch, by the file's delta.
    saved = load_file(Path(spec.pretrained) / "unet" / "diffusion_pytorch_model.safetensors")
    deltas = map_patch_keys_to_diffusers(
        load_fooocus_patch(Path(spec.inpaint_repo) / spec.patch_file), pipe.unet.config, saved.keys()
    )
    assert set(deltas) == set(saved)
    patched = dict(pipe.unet.named_parameters())
    for name in ("conv_in.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", "add_embedding.linear_1.bias"):
        current = patched[name.replace("conv_in.", "conv_in.conv.")]
        assert torch.allclose(current, saved[name] + deltas[name], atol=1e-6)

    # diffusers' own inpainting pipeline drives the wrapped UNet (9-channel branch).
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = pipe(
        prompt="a photo of sks can",
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(out)).all()


def test_missing_fooocus_files_are_config_errors(tmp_path, compose):
    spec = FooocusSpec.from_config(compose("train", ["model=tiny_fooocus"]).model)
    missing_patch = FooocusSpec(**{**spec.__dict__, "patch_file": str(tmp_path / "nope.patch")})
    with pytest.raises(DreamMixError, match="model.patch_file"):
        load_fooocus_components(missing_patch)
    # Offline and no cached copy: a one-line error instead of a hub traceback.
    hub = FooocusSpec(**{**spec.__dict__, "inpaint_repo": "lllyasviel/fooocus_inpaint", "build_if_missing": False})
    with pytest.raises(DreamMixError, match="model.head_file") as info:
        load_fooocus_components(hub)
    assert "\n" not in str(info.value)
    # build_if_missing builds the tiny model into local folders only, never into ./<hub id>/.
    with pytest.raises(DreamMixError, match="model.inpaint_repo"):
        load_fooocus_components(FooocusSpec(**{**hub.__dict__, "build_if_missing": True}))
    assert not Path("lllyasviel").exists()


def test_lora_trained_on_the_fooocus_base_reloads_into_it(tmp_path, compose):
    """Export with save_lora, reload with diffusers' load_lora_weights: same UNet output."""
    from dreammix.models.lora import LoraSpec, add_lora, save_lora

    spec = FooocusSpec.from_config(compose("train", ["model=tiny_fooocus"]).model)
    trained = load_fooocus_components(spec)
    lora = LoraSpec(rank=4, alpha=8.0)
    for p in add_lora(trained.unet, lora):
        p.data.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    save_lora(trained.unet, tmp_path / "lora", lora)

    fresh = load_fooocus_components(spec)
    latents, mask, masked, t, cond = _unet_inputs(fresh.unet)
    x9 = torch.cat([latents, mask, masked], dim=1)
    with torch.no_grad():
        base = fresh.unet(x9, t, **cond).sample
        fresh.load_lora_weights(tmp_path / "lora")
        reloaded = fresh.unet(x9, t, **cond).sample
        expected = trained.unet.eval()(x9, t, **cond).sample
    assert torch.allclose(reloaded, expected, atol=1e-4)
    assert not torch.allclose(reloaded, base, atol=1e-3)


def test_real_sdxl_ldm_names_map_through_the_converter():
    """Names as they appear in SDXL checkpoints/Fooocus patches, on the real SDXL UNet shape
    (built on the meta device: no weights, no download)."""
    from diffusers import UNet2DConditionModel

    from dreammix.models.fooocus import diffusers_to_ldm_unet_key

    from dreammix.models.sdxl_arch import UNET_CONFIG

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": 4})  # the SDXL *base* UNet
    expected = {
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight",
        "input_blocks.6.0.op.weight": "down_blocks.1.downsamplers.0.conv.weight",
        "input_blocks.7.0.skip_connection.weight": "down_blocks.2.resnets.0.conv_shortcut.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight": "mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight",
        "output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.8.0.skip_connection.weight": "up_blocks.2.resnets.2.conv_shortcut.weight",
        "label_emb.0.0.weight": "add_embedding.linear_1.weight",
    }
    keys = sdxl.state_dict().keys()
    mapped = map_patch_keys_to_diffusers({"diffusion_model." + k: torch.zeros(1) for k in expected}, sdxl.config, keys)
    assert sorted(mapped) == sorted(expected.values())
    # A patch naming every SDXL UNet weight maps one to one.
    full = {"diffusion_model." + diffusers_to_ldm_unet_key(k, sdxl.config): torch.zeros(1) for k in keys}
    assert sorted(map_patch_keys_to_diffusers(full, sdxl.config, keys)) == sorted(keys)
