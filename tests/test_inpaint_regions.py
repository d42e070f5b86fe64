"""``src/inpaint.py regions=[…]`` (multi-subject from the command line) and the LoRA catalog it reads."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from dreammix.crop import feather
from dreammix.errors import DreamMixError
from dreammix.lora_catalog import find_loras, parse_words, read_lora_entry, same_base, suggested_eliminate
from lora_runs import make_train_run

H, W = 64, 128
DOG_ATTRS = {"color": ["brown", "white"], "fur": ["fluffy"]}
CAN_ATTRS = {"color": ["blue", "silver"], "material": ["aluminum"]}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs") / "train"
    dog = make_train_run(tiny_model_dir, root / "dog" / "2026-01-01", "dog", "dog", DOG_ATTRS, seed=0)
    can = make_train_run(tiny_model_dir, root / "can" / "2026-01-02", "can", "can", CAN_ATTRS, seed=1)
    return root, dog, can


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "room.png")
    for name, cols in (("dog", (10, 40)), ("can", (80, 110))):
        m = np.zeros((H, W), np.uint8)
        m[20:44, cols[0] : cols[1]] = 255
        Image.fromarray(m).save(tmp_path / f"{name}.png")
    return tmp_path


def test_catalog_reads_subject_base_trigger_and_attributes(runs, tiny_model_dir, tmp_path):
    root, dog, can = runs
    entries = find_loras([root, tmp_path / "missing"])
    assert [e.subject for e in entries] == ["can", "dog"]  # sorted by path
    entry = read_lora_entry(dog)
    assert entry.trigger == "sks dog" and entry.base_model == str(tiny_model_dir)
    assert entry.attributes == DOG_ATTRS and same_base(entry, str(tiny_model_dir))
    assert not same_base(entry, "stabilityai/stable-diffusion-xl-base-1.0")
    # the offline same-category rule: "black" is a colour, so the dictionary's colours go
    assert suggested_eliminate(entry, "a black sks dog") == ["brown", "white"]
    assert suggested_eliminate(entry, "a black dog") == []  # no identifier: no TAS
    assert parse_words(" brown ,, white  fur ") == ["brown", "white fur"]
    with pytest.raises(DreamMixError, match="has no pytorch_lora_weights"):
        read_lora_entry(tmp_path)


def _cfg(compose, files, *overrides):
    return compose("inpaint", [f"image={files / 'room.png'}", "model=tiny", "steps=2", f"run_dir={files / 'run'}",
                               "progress=false", "dif.feather_radius=2", *overrides])  # fmt: skip


def _regions(files, dog, can, dog_prompt="a black sks dog"):
    return (f"regions=[{{mask:{files / 'dog.png'},prompt:'{dog_prompt}',lora:{dog}}},"
            f"{{mask:{files / 'can.png'},prompt:'a sks can',lora:{can},lora_scale:0.5,eliminate:[silver]}}]")  # fmt: skip


def test_regions_from_the_config_resolve_tas_per_subject(compose, files, runs):
    from dreammix.inpaint_regions import regions_from_config

    _, dog, can = runs
    regions = regions_from_config(_cfg(compose, files, _regions(files, dog, can)), (W, H))
    assert [r.eliminate for r in regions] == [["brown", "white"], ["silver"]]
    assert [r.lora_scale for r in regions] == [1.0, 0.5] and regions[0].mask.shape == (H, W)
    off = regions_from_config(_cfg(compose, files, _regions(files, dog, can), "tas.enabled=false"), (W, H))
    assert [r.eliminate for r in off] == [[], []]


def test_two_regions_write_an_input_sized_png(compose, files, runs):
    from dreammix.inpaint import run_inpaint

    _, dog, can = runs
    (out, grid) = run_inpaint(_cfg(compose, files, _regions(files, dog, can), "save_grid=true"))
    final, x = np.asarray(Image.open(out)), np.asarray(Image.open(files / "room.png"))
    assert final.shape == x.shape and Image.open(grid).size == (4 * W, H)
    masks = [np.asarray(Image.open(files / f"{n}.png")) > 127 for n in ("dog", "can")]
    for m in masks:
        assert not np.array_equal(final[m], x[m])
    far = (feather(masks[0], 2) == 0) & (feather(masks[1], 2) == 0)
    assert np.array_equal(final[far], x[far])


def test_bad_regions_fail_before_the_model_loads(compose, files, runs, monkeypatch):
    import dreammix.inpaint as inpaint

    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: pytest.fail("model loaded before input was checked"))
    _, dog, can = runs
    cases = [
        ([_regions(files, dog, can), f"mask={files / 'dog.png'}"], "give mask inside each region"),
        ([_regions(files, dog, can, dog_prompt="a black dog"), "tas.enabled=true"], r"no 'sks'.*\(regions\[0\]\.prompt\)"),
        ([f"regions=[{{mask:{files / 'nope.png'},prompt:x}}]"], "file not found"),
        ([f"regions=[{{mask:{files / 'dog.png'},prompt:x,lora:{files}}}]"], "has no pytorch_lora_weights"),
        ([f"regions=[{{mask:{files / 'dog.png'}}}]"], "region 0 has no prompt"),
        ([f"regions=[{{mask:{files / 'dog.png'},prompt:a}},{{mask:{files / 'dog.png'},prompt:b}}]"], "overlap in 720 pixels"),
        ([_regions(files, dog, can), "sampler.sharpness=1"], "not supported with regions="),
    ]
    for overrides, match in cases:
        with pytest.raises(DreamMixError, match=match):
            inpaint.run_inpaint(_cfg(compose, files, *overrides))


@pytest.mark.slow
def test_cli_overlapping_regions_exit_2_with_one_line(files, runs, tiny_model_dir):
    _, dog, can = runs
    regions = (f"regions=[{{mask:{files / 'dog.png'},prompt:'a sks dog',lora:{dog}}},"
               f"{{mask:{files / 'dog.png'},prompt:'a sks can',lora:{can}}}]")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "DREAMMIX_CACHE": str(tiny_model_dir.parent)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "src" / "inpaint.py"), f"image={files / 'room.png'}", regions, "model=tiny",
         "steps=1", "progress=false", f"run_dir={files / 'run'}"],
        cwd=files, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: masks of regions 0 and 1 overlap in 720 pixels; each pixel may belong to one subject "
                      "(erase the overlap from one of them) (regions)"]  # fmt: skip
    assert not (files / "run" / "inpainted.png").exists()
