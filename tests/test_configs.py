"""Every config group option and every subject composes; subject configs match the dataset."""


import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR

SUBJECTS = sorted(p.stem for p in (CONF_DIR / "subject").glob("*.yaml") if p.stem != "custom")
TRAIN_GROUPS = ["model", "data", "loss", "adapter", "optim", "trainer", "logger", "paths", "experiment"]


def test_thirty_subjects_are_configured():
    assert len(SUBJECTS) == 30


@pytest.mark.parametrize("subject", SUBJECTS)
def test_every_subject_composes(compose, subject):
    cfg = compose("train", [f"subject={subject}", "run_dir=/tmp/x"])
    assert cfg.subject.name == subject
    assert cfg.subject.kind in ("object", "live")
    assert cfg.subject.image_dir.endswith(f"images/{subject}")
    assert cfg.data.source_prompt == f"a photo of sks {cfg.subject.class_noun}"


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in TRAIN_GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))],
)
def test_every_group_option_composes_and_resolves(compose, group, option):
    key = "adapter@lora" if group == "adapter" else group  # LoRA settings live under `lora`
    cfg = compose("train", [f"{key}={option}", "run_dir=/tmp/x", "subject=can"])
    OmegaConf.resolve(cfg)  # no dangling interpolation


def test_paper_defaults(compose):
    cfg = compose("train", ["run_dir=/tmp/x"])
    assert cfg.model.pretrained == "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
    assert cfg.model.resolution == 1024
    assert (cfg.lora.rank, list(cfg.lora.target_modules)) == (4, ["to_k", "to_v"])
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert (cfg.loss.tau_in, cfg.loss.tau_out, cfg.loss.beta) == (1.5, 0.7, 0.4)


def test_dreambooth_baseline_experiment(compose):
    cfg = compose("train", ["experiment=dreambooth", "run_dir=/tmp/x"])
    assert (cfg.loss.tau_in, cfg.loss.tau_out, cfg.loss.beta) == (1.0, 1.0, 0.0)


def test_command_line_overrides_reach_the_config(compose):
    cfg = compose("train", ["lora.rank=8", "loss.tau_in=1.0", "model=tiny", "run_dir=/tmp/x"])
    assert cfg.lora.rank == 8 and cfg.loss.tau_in == 1.0 and cfg.model.name == "tiny"


def test_subject_configs_match_the_dataset(shared_data, tmp_path):
    from dreammix.data.dreambooth import parse_prompts_and_classes, write_subject_configs

    facts = parse_prompts_and_classes(shared_data / "dreambooth" / "prompts_and_classes.txt")
    assert len(facts.classes) == 30 and len(facts.object_prompts) == 25 and len(facts.live_prompts) == 25
    assert facts.prompts_for("dog")[10] == "a sks dog wearing a red hat"
    written = write_subject_configs(shared_data / "dreambooth", tmp_path)
    for path in written:
        committed = CONF_DIR / "subject" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: regenerate it"
    for name in facts.classes:
        assert (shared_data / "dreambooth" / "images" / name).is_dir()
