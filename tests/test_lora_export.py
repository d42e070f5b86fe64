"""LoRAs that ComfyUI, A1111/Forge and Fooocus load: the kohya/webui layout, its alpha and metadata,
the export of runs and checkpoints, the model card, and output file modes (issue 15)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreammix.errors import DreamMixError
from test_data import make_subject

REPO = Path(__file__).resolve().parents[1]

# Every layer type a LoRA can sit on in an SDXL UNet (peft suffix match): attention projections,
# transformer in/out and feed-forward, resnet convs and time projection, down/up-sampler convs,
# the time/label embeddings, conv_in/conv_out.
ALL_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv", "linear_1", "linear_2", "conv_in", "conv_out",
]


def documented_sdxl_sgm_name(diffusers_module: str) -> str:
    """The SDXL diffusers → original (SGM) module table as kohya's sd-scripts write it out
    (``networks/lora_diffusers.py: make_unet_conversion_map``, also A1111's ``lora_convert``):
    3 blocks, 2 resnets per down block, 3 per up block, SDXL's fixed indices. Independent of the
    converter under test, which derives the indices from the UNet config."""
    pairs = []
    for i in range(3):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.2."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
        pairs.append((f"time_embedding.linear_{j + 1}.", f"time_embed.{2 * j}."))
        pairs.append((f"add_embedding.linear_{j + 1}.", f"label_emb.0.{2 * j}."))
    pairs += [("conv_in.", "input_blocks.0.0."), ("conv_out.", "out.2.")]
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    name = diffusers_module.replace("conv_in.conv", "conv_in") + "."  # Fooocus wraps the base's conv_in
    for hf, sd in pairs:
        if name.startswith(hf):
            rest = name[len(hf):-1]
            if ".resnets." in hf:
                rest = resnet[rest]
            return (sd + rest).rstrip(".")
    raise AssertionError(f"no documented SGM name for {diffusers_module}")


def _meta_unet(fooocus: bool):
    from diffusers import UNet2DConditionModel

    from dreammix.models import sdxl_arch
    from dreammix.models.fooocus import FooocusConvIn, FooocusInpaintHead

    with torch.device("meta"):
        if not fooocus:
            return UNet2DConditionModel(**sdxl_arch.UNET_CONFIG)
        unet = UNet2DConditionModel(**{**sdxl_arch.UNET_CONFIG, "in_channels": 4})  # an SDXL *base*
        unet.conv_in = FooocusConvIn(unet.conv_in, FooocusInpaintHead(320))
        return unet


@pytest.mark.parametrize("fooocus", [False, True], ids=["sdxl_inpaint", "fooocus"])
def test_kohya_names_follow_the_documented_sdxl_scheme_for_every_lora_module(fooocus):
    """Real SDXL architecture on the meta device (no memory), a LoRA on every layer type: each
    module gets ``lora_unet_`` + its documented SGM path with ``_``, down/up factors and alpha 8
    (rank 2 — diffusers' convert_state_dict_to_kohya would write alpha = rank = 2)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreammix.models.kohya import to_kohya_state_dict

    unet = _meta_unet(fooocus)
    # Fooocus: the same SDXL blocks (covered by the first case); what differs is the wrapped
    # conv_in (its .conv is the base's conv_in), reached through "conv" with the sampler convs.
    targets = ["to_k", "to_v", "conv"] if fooocus else ALL_TARGETS
    with torch.device("meta"):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    modules = {k.rsplit(".", 2)[0].removesuffix(".lora") for k in weights}
    assert len(modules) > (280 if fooocus else 700) and any(m.endswith("attn2.to_k") for m in modules)
    assert ("conv_in.conv" if fooocus else "conv_in") in modules
    kohya = to_kohya_state_dict(weights, alpha=8, unet_config=unet.config)
    expected = {"lora_unet_" + documented_sdxl_sgm_name(m).replace(".", "_") for m in modules}
    assert {k.split(".", 1)[0] for k in kohya} == expected
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k" in expected
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v" in expected
    assert "lora_unet_input_blocks_0_0" in expected and "lora_unet_output_blocks_2_2_conv" in expected
    for name in expected:
        assert kohya[f"{name}.lora_down.weight"].shape[0] == 2 and kohya[f"{name}.lora_up.weight"].shape[1] == 2
        assert kohya[f"{name}.alpha"].item() == 8.0
    assert len(kohya) == 3 * len(expected)


def test_modules_outside_the_scheme_are_refused():
    from dreammix.models.kohya import to_kohya_state_dict

    config = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D"] * 3}
    down = torch.zeros(2, 4)
    for bad in ("encoder_hid_proj", "down_blocks.1.attentions.0.transformer_blocks.0.norm1", "down_blocks.1.resnets.2.conv1"):
        with pytest.raises(DreamMixError, match="cannot express") as err:
            to_kohya_state_dict({f"unet.{bad}.lora_A.weight": down}, 4, config)
        assert "\n" not in str(err.value)
    with pytest.raises(DreamMixError, match="layers_per_block"):
        to_kohya_state_dict({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": down}, 4, {"layers_per_block": [2, 2, 2]})


def _random_lora_unet(tiny_model_dir, targets, rank=2, alpha=8.0):
    from diffusers import UNet2DConditionModel

    from dreammix.models.lora import LoraSpec, add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    spec = LoraSpec(rank=rank, alpha=alpha, target_modules=tuple(targets))
    add_lora(unet, spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return unet.eval(), spec


def _unet_output(unet):
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 9, 8, 8, generator=gen)
    embeds = torch.randn(1, 77, 64, generator=gen)
    cond = {"text_embeds": torch.randn(1, 32, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=embeds, added_cond_kwargs=cond).sample


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(tiny_model_dir, tmp_path, one_thread):
    """diffusers' ``load_lora_weights`` reads our kohya file (SGM names, per-module alpha) back into
    the same adapter: the UNet output equals the trained UNet's and the diffusers file's."""
    from dreammix.export import LoraExport, unet_layout, write_lora_folder
    from dreammix.models.loading import ModelSpec, load_inpaint_pipeline
    from dreammix.models.lora import lora_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]
    unet, spec = _random_lora_unet(tiny_model_dir, targets)
    trained = _unet_output(unet)
    info = {"subject": "thing", "class_noun": "thing", "model": "tiny", "resolution": 64, "unet_layout": unet_layout(unet.config)}
    folder = write_lora_folder(LoraExport(lora_state_dict(unet), spec, info), tmp_path / "lora")
    kohya_file = folder / "thing_tiny.safetensors"
    with safe_open(str(kohya_file), "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 8.0

    outputs = {}
    for name, source in (("diffusers", str(folder)), ("kohya", str(kohya_file))):
        pipe = load_inpaint_pipeline(ModelSpec(name="tiny", pretrained=str(tiny_model_dir), resolution=64))
        base = _unet_output(pipe.unet)
        pipe.load_lora_weights(source)
        to_k = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_k"))
        assert list(to_k.scaling.values()) == [4.0]  # alpha 8 / rank 2, not 1
        outputs[name] = _unet_output(pipe.unet)
    assert (trained - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(outputs["diffusers"], trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["kohya"], trained, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_kohya_file_loads_on_the_fooocus_base_like_the_diffusers_file(compose, tmp_path, one_thread):
    """The same on the tiny Fooocus base (SDXL base UNet + inpaint head wrapped around conv_in)."""
    from dreammix.export import LoraExport, unet_layout, write_lora_folder
    from dreammix.models.loading import load_pipeline, model_spec_from_config
    from dreammix.models.lora import LoraSpec, add_lora, lora_state_dict

    spec_model = model_spec_from_config(compose("train", ["model=tiny_fooocus"]).model)
    pipe = load_pipeline(spec_model)
    spec = LoraSpec(rank=2, alpha=8, target_modules=("to_k", "to_v", "to_out.0", "ff.net.2", "conv1"))
    add_lora(pipe.unet, spec)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    trained = _unet_output(pipe.unet.eval())
    info = {"subject": "thing", "model": "tiny_fooocus", "resolution": 64, "unet_layout": unet_layout(pipe.unet.config)}
    folder = write_lora_folder(LoraExport(lora_state_dict(pipe.unet), spec, info), tmp_path / "lora")
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in load_file(folder / "thing_tiny_fooocus.safetensors")
    for source in (str(folder), str(folder / "thing_tiny_fooocus.safetensors")):
        fresh = load_pipeline(spec_model)
        fresh.load_lora_weights(source)
        torch.testing.assert_close(_unet_output(fresh.unet.eval()), trained, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ a training run end to end
@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """One 4-step tiny run under umask 022: checkpoints every 2 steps, keep the last 1, samples."""
    from hydra import compose, initialize_config_dir

    from dreammix.train import train

    root = tmp_path_factory.mktemp("export-run")
    subject = make_subject(root / "subject", n=2)
    overrides = [
        "model=tiny", "logger=none", "subject=custom", f"run_dir={root / 'run'}",
        "subject.name=thing", "subject.class_noun=thing",
        f"subject.image_dir={subject.image_dir}", f"subject.mask_dir={subject.mask_dir}",
        "trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "data.mask_variants=2", "lora.rank=2", "lora.alpha=8", "optim.lr=1e-2",
        "validation.every_n_steps=2", "validation.num_samples=1", "validation.num_inference_steps=2",
        "checkpoint.every_n_steps=1", "checkpoint.keep_last=2",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    old = os.umask(0o022)
    try:
        return train(cfg)
    finally:
        os.umask(old)


def test_run_writes_kohya_file_with_alpha_and_metadata(run):
    lora = run / "lora"
    kohya = load_file(lora / "thing_tiny.safetensors")
    diffusers = load_file(lora / "pytorch_lora_weights.safetensors")
    assert len(kohya) == 3 * len(diffusers) // 2  # down, up, alpha per module
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    key = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k"  # tiny: 1 layer per block → per = 2
    torch.testing.assert_close(kohya[f"{key}.lora_down.weight"], diffusers["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight"])
    with safe_open(str(lora / "thing_tiny.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.trigger_phrase"] == "sks thing" and meta["ss_steps"] == "4"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.architecture"].startswith("stable-diffusion-xl-v1-base")
    assert meta["ss_sd_model_name"].endswith("tiny-sdxl-inpaint")
    assert json.loads(meta["ss_dreammix_loss"])["tau_in"] == 1.5


def test_model_card_describes_the_lora(run):
    card = (run / "lora" / "README.md").read_text()
    for needle in ("tiny-sdxl-inpaint", "`sks thing`", "| LoRA rank | `2` |", "| LoRA alpha | `8.0`", "| steps | `4` |",
                   "`loss.tau_in` | `1.5`", "load_lora_weights", "ComfyUI/models/loras/", "Fooocus/models/loras/",
                   "thing_tiny.safetensors", "![masked input | sample](samples.png)"):
        assert needle in card, needle
    assert (run / "lora" / "samples.png").read_bytes() == (run / "samples" / "step_000004.png").read_bytes()


def test_checkpoints_keep_the_last_k_each_with_its_lora(run):
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*.ckpt")) == ["step_000003.ckpt", "step_000004.ckpt"]
    assert sorted(p.name for p in ckpts.glob("lora_step_*")) == ["lora_step_000003", "lora_step_000004"]
    for step in (3, 4):
        folder = ckpts / f"lora_step_{step:06d}"
        assert {"pytorch_lora_weights.safetensors", "thing_tiny.safetensors"} <= {p.name for p in folder.iterdir()}
        assert json.loads((folder / "dreammix_run.json").read_text())["steps"] == step
    a = load_file(ckpts / "lora_step_000003" / "pytorch_lora_weights.safetensors")
    b = load_file(ckpts / "lora_step_000004" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 0  # a different step, different weights
    final = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(final[k], b[k]) for k in final)


def test_export_of_a_checkpoint_gives_the_lora_written_at_that_step(run, tmp_path):
    from dreammix.export import main

    ckpts = run / "checkpoints"
    for fmt, name in (("diffusers", "pytorch_lora_weights.safetensors"), ("kohya", "thing_tiny.safetensors")):
        out = main([str(ckpts / "step_000003.ckpt"), "--format", fmt, "--out", str(tmp_path / fmt)])
        got, want = load_file(out / name), load_file(ckpts / "lora_step_000003" / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    with safe_open(str(tmp_path / "kohya" / "thing_tiny.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "3"
    assert not (tmp_path / "kohya" / "pytorch_lora_weights.safetensors").exists()


def test_export_of_a_run_folder_adds_the_kohya_file(run, tmp_path):
    import shutil

    from dreammix.export import main

    copy = tmp_path / "run"
    shutil.copytree(run / "lora", copy / "lora")
    (copy / "lora" / "thing_tiny.safetensors").unlink()
    (copy / "lora" / "notes.txt").write_text("mine")
    main([str(copy), "--format", "kohya"])
    got, want = load_file(copy / "lora" / "thing_tiny.safetensors"), load_file(run / "lora" / "thing_tiny.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert (copy / "lora" / "notes.txt").read_text() == "mine"  # nothing else in the folder is touched
    with safe_open(str(copy / "lora" / "thing_tiny.safetensors"), "pt") as a, safe_open(str(run / "lora" / "thing_tiny.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "src" / "export_lora.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_cli_bad_format_is_one_line_exit_2(run):
    done = _cli(run / "checkpoints" / "step_000004.ckpt", "--format", "foo")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "unknown format 'foo'" in done.stderr
    done = _cli(run / "lora")
    assert done.returncode == 0 and done.stdout.strip() == str(run / "lora")


def test_export_bad_input_is_one_line_exit_2(run, tmp_path, capsys):
    from dreammix.export import main

    ckpt = run / "checkpoints" / "step_000004.ckpt"
    with pytest.raises(SystemExit) as exit_:
        main([str(ckpt), "--format", "foo", "--out", str(tmp_path / "foo")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: unknown format 'foo'")
    assert not (tmp_path / "foo").exists()

    # a checkpoint of another LoRA config than its run's record
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["dreammix_lora"] = {**state["dreammix_lora"], "alpha": 2.0}
    torch.save(state, run / "checkpoints" / "other.ckpt")
    try:
        with pytest.raises(SystemExit) as exit_:
            main([str(run / "checkpoints" / "other.ckpt"), "--out", str(tmp_path / "x")])
    finally:
        (run / "checkpoints" / "other.ckpt").unlink()
    assert exit_.value.code == 2 and not (tmp_path / "x").exists()
    assert "is not the LoRA of run record" in capsys.readouterr().err
    # tensors of another rank than the record says
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["dreammix_lora"]["rank"] = 4
    torch.save(state, tmp_path / "rank.ckpt")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "rank.ckpt"), "--out", str(tmp_path / "y"), "--run-info", str(run / "lora" / "dreammix_run.json")])
    assert "rank [2], the record says rank 4" in capsys.readouterr().err
    # a module the kohya names cannot express: nothing is written
    from dreammix.export import LoraExport, read_lora_folder, write_lora_folder

    export = read_lora_folder(run / "lora")
    weights = {k.replace("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "encoder_hid_proj.to_k"): v
               for k, v in export.weights.items()}
    with pytest.raises(DreamMixError, match="cannot express UNet module 'encoder_hid_proj.to_k'"):
        write_lora_folder(LoraExport(weights, export.spec, export.info), tmp_path / "z")
    assert not (tmp_path / "z").exists()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_honour_the_umask(run, tmp_path):
    """Under umask 022 everything a run writes is 0644 / 0755 (mkstemp/mkdtemp alone give 0600/0700)."""
    for path in [run / "lora", *(run / "lora").iterdir(), run / "checkpoints" / "lora_step_000004",
                 *(run / "checkpoints" / "lora_step_000004").iterdir()]:
        assert _mode(path) == (0o755 if path.is_dir() else 0o644), path

    from PIL import Image

    from dreammix.atomic import atomic_save_image, atomic_write_dir, atomic_write_text
    from dreammix.models.tiny import ensure_tiny_pipeline

    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        old = os.umask(umask)
        try:
            root = tmp_path / f"u{umask:o}"
            atomic_write_text(root / "table.md", "| a |")
            atomic_save_image(Image.new("RGB", (2, 2)), root / "image.png")
            atomic_write_dir(root / "folder", lambda d: (d / "sub").mkdir() or (d / "sub" / "f.txt").write_text("x"))
            if umask == 0o022:
                cache = ensure_tiny_pipeline(root / ".cache" / "tiny-sdxl-inpaint")
        finally:
            os.umask(old)
        for path in (root / "table.md", root / "image.png", root / "folder" / "sub" / "f.txt"):
            assert _mode(path) == file_mode, path
        for path in (root / "folder", root / "folder" / "sub"):
            assert _mode(path) == dir_mode, path
    assert _mode(cache) == 0o755 and _mode(cache / "unet") == 0o755
    assert _mode(cache / "model_index.json") == 0o644
