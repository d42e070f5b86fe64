"""ADM: attribute dictionaries, prompt composition, regular-set generation, resume, TAS selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_openai_server import FakeOpenAIServer, chat_reply, error_reply
from PIL import Image

from dreammix import adm as adm_module
from dreammix.adm import RegularItem, generate_regular_set, make_background, make_mask, read_manifest, run_adm
from dreammix.attributes import compose_prompts, normalize_attributes, select_attributes_to_eliminate
from dreammix.data.regular import load_regular_examples
from dreammix.errors import DreamMixError
from dreammix.tas import select_eliminate_words
from dreammix.vlm import VLMClient, VLMSettings

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-SECRET-adm-9876543210fedcba"
CAN = {"color": ["blue", "silver"], "material": ["aluminum", "metal"], "shape": ["cylindrical"],
       "accessories": ["pull tab", "whale illustration"]}
FAST = ["model=tiny", "logger=none", "adm.resolution=64", "adm.num_inference_steps=2", "adm.guidance_scale=1.0"]


def adm_cfg(compose, tmp_path, *overrides):
    return compose("adm", [*FAST, f"adm.out_dir={tmp_path / 'regular'}", f"run_dir={tmp_path / 'run'}", *overrides])


# --- attribute dictionaries ---------------------------------------------------------------------


def test_the_30_subject_configs_ship_honest_attribute_dictionaries():
    subjects = [p for p in (REPO / "conf" / "subject").glob("*.yaml") if p.stem != "custom"]
    assert len(subjects) == 30
    for path in subjects:
        config = yaml.safe_load(path.read_text())
        assert {"name", "class_noun", "kind", "image_dir", "mask_dir", "attributes_file"} <= set(config)
        attributes = config["attributes"]
        assert "color" in attributes and len(attributes) >= 3, path.name
        assert normalize_attributes(attributes, path.name) == attributes, f"{path.name}: not lowercase/unique"
        assert all(2 <= len(words) <= 6 for words in attributes.values()), path.name


def test_subject_configs_are_what_the_generator_writes(shared_data, tmp_path):
    from dreammix.data.dreambooth import write_subject_configs

    for path in write_subject_configs(shared_data / "dreambooth", tmp_path):
        assert path.read_text() == (REPO / "conf" / "subject" / path.name).read_text(), path.name


def test_attribute_file_overrides_the_subject_dictionary(compose, tmp_path):
    from dreammix.adm import resolve_attributes

    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"Color": ["Red ", "red", "green"], "material": "glass"}))
    cfg = adm_cfg(compose, tmp_path, "vlm=offline", f"subject.attributes_file={path}")
    assert resolve_attributes(cfg)[0] == {"color": ["red", "green"], "material": ["glass"]}
    path.write_text("{oops")
    with pytest.raises(DreamMixError, match="invalid JSON"):
        resolve_attributes(cfg)
    cfg = adm_cfg(compose, tmp_path, "vlm=offline", "subject=custom", "subject.class_noun=mug", "subject.image_dir=x")
    with pytest.raises(DreamMixError, match="no attribute dictionary for subject 'custom'"):
        resolve_attributes(cfg)


# --- prompts, masks, backgrounds ------------------------------------------------------------------


def test_prompt_composition_is_deterministic_for_a_seed_and_uses_dictionary_words():
    first = compose_prompts(CAN, "can", 20, seed=3)
    assert first == compose_prompts(CAN, "can", 20, seed=3)
    assert first != compose_prompts(CAN, "can", 20, seed=4)
    assert compose_prompts(CAN, "can", 30, seed=3)[:20] == first  # extending keeps the start
    words = {w for ws in CAN.values() for w in ws}
    for prompt in first:
        head, _, tail = prompt.partition(" can")
        article, *before = head.split(" ", 1)
        assert article in ("a", "an")
        assert all(w in words for w in " ".join(before).split(" ") if w) or " ".join(before) in words
        assert tail == "" or tail.removeprefix(" with ") in words
    assert len(set(first)) > 10  # recombination, not one prompt repeated
    assert compose_prompts(CAN, "can", 3, seed=0, identifier="sks")[0].startswith("a sks ")
    assert compose_prompts({"material": ["aluminum"]}, "can", 1, seed=0, after_prob=0) == ["an aluminum can"]


def test_masks_are_binary_exact_and_seeded():
    for seed in range(20):
        mask = make_mask(seed, (96, 64))
        values = np.asarray(mask)
        assert mask.mode == "L" and mask.size == (96, 64)
        assert set(np.unique(values)) <= {0, 255}
        assert 0.25 <= (values == 255).mean() <= 0.65
    assert make_mask(5, (64, 64)).tobytes() == make_mask(5, (64, 64)).tobytes()
    assert make_mask(5, (64, 64)).tobytes() != make_mask(6, (64, 64)).tobytes()
    with pytest.raises(DreamMixError, match="adm.mask_area"):
        make_mask(0, (64, 64), area=(0.5, 1.2))


def test_backgrounds_are_seeded_and_can_come_from_a_folder(tmp_path):
    plain = make_background(1, (64, 48))
    assert plain.size == (64, 48) and plain.mode == "RGB"
    assert plain.tobytes() == make_background(1, (64, 48)).tobytes()
    photo = tmp_path / "bg.jpg"
    Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3))).save(photo)
    assert make_background(2, (32, 32), [photo]).size == (32, 32)


# --- generation -------------------------------------------------------------------------------------


def test_tiny_model_run_writes_a_regular_set_the_datamodule_loads_and_resumes(compose, tmp_path, tiny_model_dir,
                                                                             monkeypatch):
    cfg = adm_cfg(compose, tmp_path, "vlm=offline", "adm.num_prompts=3", "adm.batch_size=2", "adm.base_seed=10")
    out = run_adm(cfg)
    entries = read_manifest(out)
    assert [e["seed"] for e in entries] == [10, 11, 12]
    assert [list(e) for e in entries] == [["image", "mask", "prompt", "seed"]] * 3
    assert json.loads((out / "attributes.json").read_text()) == dict(cfg.subject.attributes)
    for entry in entries:
        image, mask = Image.open(out / entry["image"]), Image.open(out / entry["mask"])
        assert image.size == mask.size == (64, 64) and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) == {0, 255}
    examples = load_regular_examples(out)
    assert [e.prompt for e in examples] == [e["prompt"] for e in entries]

    # Rerun: nothing to do, the model is not even loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("a finished set must not load the model")

    monkeypatch.setattr("dreammix.models.loading.load_inpaint_pipeline", no_model)
    before = (out / "manifest.jsonl").read_text()
    run_adm(cfg)
    assert (out / "manifest.jsonl").read_text() == before

    # Other prompt settings on an existing set: refused rather than mixed; overwrite=true rebuilds.
    with pytest.raises(DreamMixError, match="other prompt settings"):
        run_adm(adm_cfg(compose, tmp_path, "vlm=offline", "adm.num_prompts=3", "adm.base_seed=99"))
    monkeypatch.setattr(adm_module, "_generate", lambda *a, **k: None)
    run_adm(adm_cfg(compose, tmp_path, "vlm=offline", "adm.num_prompts=3", "adm.base_seed=99", "adm.overwrite=true"))
    assert not (out / "manifest.jsonl").exists() and not list((out / "images").glob("*.png"))
    assert json.loads((out / "prompts.json").read_text())["settings"]["base_seed"] == 99


def _stub_pipe(fail_on_call: int | None = None):
    """A stand-in pipeline: solid images, and an optional crash (a killed run) on call N."""
    calls = []

    class Output:
        def __init__(self, images):
            self.images = images

    def pipe(**kwargs):
        calls.append(kwargs)
        assert kwargs["strength"] == 1.0
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return Output([Image.new("RGB", (kwargs["width"], kwargs["height"]), (9, 9, 9)) for _ in kwargs["prompt"]])

    pipe.calls = calls
    return pipe


def test_a_killed_run_loses_nothing_written_and_the_rerun_finishes(tmp_path):
    items = [RegularItem(i, f"a red can {i}", 100 + i) for i in range(5)]
    out = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        generate_regular_set(_stub_pipe(fail_on_call=2), items, out, resolution=32, batch_size=2, progress=False)
    entries = read_manifest(out)
    assert [e["seed"] for e in entries] == [100, 101]
    assert all((out / e["image"]).is_file() and (out / e["mask"]).is_file() for e in entries)
    assert not list(out.rglob("*.tmp"))
    # A line cut off mid-write, and an image written just before the kill without its line.
    with open(out / "manifest.jsonl", "a") as handle:
        handle.write('{"image": "images/000002.png", "ma')
    Image.new("RGB", (32, 32)).save(out / "images" / "000002.png")
    pipe = _stub_pipe()
    entries = generate_regular_set(pipe, items, out, resolution=32, batch_size=2, progress=False)
    assert [e["seed"] for e in entries] == [100, 101, 102, 103, 104]
    assert [len(call["prompt"]) for call in pipe.calls] == [2, 1]  # only the 3 missing items
    assert len(load_regular_examples(out)) == 5
    assert [c["generator"][0].initial_seed() for c in pipe.calls] == [102, 104]


def test_vlm_run_through_the_entry_point_never_writes_the_key(compose, tmp_path, tiny_model_dir, monkeypatch):
    """`python src/adm.py` against the fake server: dictionary from the VLM, images from the tiny
    model, W&B offline; then no file of the Hydra run dir, W&B, the set or the cache holds the key."""
    images = tmp_path / "subject"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((48, 48, 3), 60 * i, np.uint8)).save(images / f"{i:02d}.png")
    answer = {"color": ["Red"], "material": ["clay"], "texture": ["matte"], "shape": [], "pattern": [], "breed": [],
              "accessories": ["a handle"]}
    overrides = [
        "vlm=openai", "vlm.model=fake-vlm", "vlm.timeout=20", "vlm.backoff_base=0.001", f"vlm.cache_dir={tmp_path / 'vlm'}",
        "subject=custom", "subject.name=mug", "subject.class_noun=mug", f"subject.image_dir={images}",
        "adm.num_prompts=2", "adm.batch_size=2", f"adm.out_dir={tmp_path / 'regular'}", *FAST,
    ]
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline"}
    with FakeOpenAIServer([chat_reply(answer)]) as server:
        result = subprocess.run(
            [sys.executable, str(REPO / "src" / "adm.py"), *overrides, "logger=wandb", "adm.log_samples=2",
             f"vlm.base_url={server.url}", f"hydra.run.dir={tmp_path / 'run'}"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(server.requests) == 1
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert len(server.requests[0]["json"]["messages"][1]["content"]) == 3  # text + 2 images
    out = tmp_path / "regular"
    assert json.loads((out / "attributes.json").read_text())["color"] == ["red"]
    assert len(load_regular_examples(out)) == 2 and all("mug" in e["prompt"] for e in read_manifest(out))

    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "adm.log").is_file()
    wandb_runs = list((run / "wandb").glob("offline-run-*/*.wandb"))
    assert wandb_runs and b"OPENAI_API_KEY" in wandb_runs[0].read_bytes()  # the config was logged, by name only
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert SECRET not in result.stdout + result.stderr

    # A rerun into a fresh set folder asks the VLM nothing (cache) and needs no key.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(adm_module, "_generate", lambda *a, **k: None)
    with FakeOpenAIServer() as server:
        run_adm(adm_cfg(compose, tmp_path, *overrides, f"vlm.base_url={server.url}", f"adm.out_dir={tmp_path / 'again'}"))
    assert server.requests == []
    assert json.loads((tmp_path / "again" / "attributes.json").read_text())["color"] == ["red"]


def test_vlm_failure_writes_nothing(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    images = tmp_path / "subject"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "00.png")
    with FakeOpenAIServer(default=error_reply(503, "overloaded")) as server:
        cfg = adm_cfg(compose, tmp_path, "vlm.max_retries=2", "vlm.backoff_base=0.001", "vlm.backoff_max=0.002",
                      f"vlm.base_url={server.url}", f"vlm.cache_dir={tmp_path / 'vlm'}", "subject=custom",
                      "subject.class_noun=mug", f"subject.image_dir={images}")
        with pytest.raises(DreamMixError, match="after 3 attempts, last: HTTP 503"):
            run_adm(cfg)
    assert len(server.requests) == 3
    assert not (tmp_path / "regular").exists()
    assert not (tmp_path / "vlm").exists() or not list((tmp_path / "vlm").rglob("*.json"))


def test_entry_point_without_a_key_prints_one_line_error(tmp_path):
    (tmp_path / "images" / "can").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "can" / "00.png")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["PYTHONPATH"] = str(REPO / "src")
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "adm.py"), "model=tiny", "logger=none", f"adm.out_dir={tmp_path / 'o'}",
         f"hydra.run.dir={tmp_path / 'run'}", f"paths.dreambooth_dir={tmp_path}", "vlm.cache_dir=null"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no API key: set the OPENAI_API_KEY")
    assert not (tmp_path / "o").exists()


# --- TAS selection -------------------------------------------------------------------------------


def test_tas_selection_offline_rule_and_vlm(tmp_path, monkeypatch):
    assert select_attributes_to_eliminate("a sks red can", CAN) == select_eliminate_words("a sks red can", CAN)
    assert select_attributes_to_eliminate("a sks red can", CAN) == ["blue", "silver"]
    assert select_attributes_to_eliminate("a sks can on the beach", CAN) == []

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    prompts = {"eliminate_system": "sys", "eliminate_user": "dict {attributes} prompt {prompt}"}
    with FakeOpenAIServer([chat_reply({"eliminate": ["Blue", "purple"]})]) as server:
        client = VLMClient(VLMSettings(model="fake-vlm", base_url=server.url, cache_dir=None), prompts)
        assert select_attributes_to_eliminate("a sks red can", CAN, client) == ["blue"]  # "purple" is not ours
    user = server.requests[0]["json"]["messages"][1]["content"][0]["text"]
    assert "prompt a sks red can" in user and '"color": ["blue", "silver"]' in user


def test_vlm_written_prompts_are_filtered_and_topped_up(compose, tmp_path, monkeypatch):
    from dreammix.adm import plan_prompts
    from dreammix.vlm import make_vlm_client

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    written = {"prompts": ["a blue aluminum can", "a shiny teapot", "  a silver can with pull tab ", "a blue aluminum can"]}
    with FakeOpenAIServer([chat_reply(written)]) as server:
        cfg = adm_cfg(compose, tmp_path, "adm.prompt_source=vlm", "adm.num_prompts=4", "adm.identifier=sks",
                      f"vlm.base_url={server.url}", "vlm.cache_dir=null")
        prompts = plan_prompts(cfg, CAN, make_vlm_client(cfg.vlm), None)
    assert prompts[:2] == ["a sks blue aluminum can", "a sks silver can with pull tab"]  # no teapot, no repeat
    assert prompts[2:] == compose_prompts(CAN, "can", 4, 0, identifier="sks")[2:]  # composed top-up
    assert "Write 4 different prompts" in server.requests[0]["json"]["messages"][1]["content"][0]["text"]
    with pytest.raises(DreamMixError, match="adm.prompt_source"):
        plan_prompts(adm_cfg(compose, tmp_path, "vlm=offline", "adm.prompt_source=vlm"), CAN, None, None)
