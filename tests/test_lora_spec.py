"""LoraSpec's bounds and its peft config, checked against peft's own LoraConfig (no model needed)."""

import pytest

from dreammix.errors import DreamMixError
from dreammix.models.lora import LoraSpec


@pytest.mark.parametrize(
    "kwargs",
    [dict(rank=1), dict(alpha=1e-6), dict(dropout=0.0), dict(dropout=0.999), dict(target_modules=("to_q",))],
)
def test_lora_spec_accepts_the_edges_of_its_ranges(kwargs):
    LoraSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs,where",
    [
        (dict(rank=0), "lora.rank"),
        (dict(alpha=0.0), "lora.alpha"),
        (dict(alpha=-1.0), "lora.alpha"),
        (dict(dropout=1.0), "lora.dropout"),
        (dict(dropout=-0.01), "lora.dropout"),
        (dict(target_modules=()), "lora.target_modules"),
    ],
)
def test_lora_spec_refuses_values_outside_its_ranges(kwargs, where):
    with pytest.raises(DreamMixError, match=where.replace(".", r"\.")):
        LoraSpec(**kwargs)


def test_lora_spec_builds_the_peft_config_it_describes():
    """Paper §4.1: rank 4 on to_k/to_v by default; every field reaches peft unchanged, and the
    adapter starts as the identity (gaussian A, zero B: peft's ``init_lora_weights="gaussian"``)."""
    from peft import LoraConfig

    assert LoraSpec() == LoraSpec(rank=4, alpha=4.0, dropout=0.0, target_modules=("to_k", "to_v"))
    config = LoraSpec(rank=3, alpha=6.0, dropout=0.25, target_modules=("to_k", "to_out.0")).to_peft()
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (3, 6.0, 0.25)
    assert set(config.target_modules) == {"to_k", "to_out.0"}
    assert config.init_lora_weights == "gaussian"


def test_add_lora_freezes_the_base_and_save_lora_replaces_an_earlier_export(tiny_model_dir, tmp_path):
    """``add_lora`` leaves only the fp32 adapter trainable (even on a bf16 base); a second export
    into the same folder (training again into a run) replaces the first
    atomically: the file holds the new weights and nothing is left beside it."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from dreammix.models.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").to(torch.bfloat16)
    spec = LoraSpec(rank=2, alpha=4.0)
    params = add_lora(unet, spec)
    # add_lora itself freezes the base: exactly the returned (fp32) adapter weights train
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert params and trainable == {id(p) for p in params}
    assert all(p.dtype == torch.float32 for p in params)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        n for n, _ in unet.named_parameters() if "lora_A" in n or "lora_B" in n}
    saved = []
    for value in (0.5, -2.0):
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.fill_(value)
        path = save_lora(unet, tmp_path / "lora", spec)
        assert path == tmp_path / "lora" / "pytorch_lora_weights.safetensors"
        saved.append(load_file(path))
    b_keys = [k for k in saved[1] if "lora_B" in k or "lora.up" in k]
    assert b_keys and all(torch.all(saved[1][k] == -2.0) for k in b_keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
