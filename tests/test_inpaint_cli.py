"""``src/inpaint.py`` / ``run_inpaint(cfg)``: files written, input handling, one-line errors."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import LORA_ALPHA, LORA_RANK, REPO_ROOT, make_real_lora
from dreammix.data.images import load_image
from dreammix.errors import DreamMixError

H, W = 64, 96


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "room.jpg", quality=95)
    mask = np.zeros((H, W), np.uint8)
    mask[20:44, 30:60] = 255
    Image.fromarray(mask).save(tmp_path / "room_mask.png")
    return tmp_path


@pytest.fixture(scope="module")
def _shared_pipeline():
    return {}


@pytest.fixture
def cached_pipeline(monkeypatch, tiny_model_dir, _shared_pipeline):
    """Load the tiny pipeline once per module (the tests using it load no LoRA into it)."""
    import dreammix.inpaint as inpaint

    cache = _shared_pipeline
    original = inpaint.load_pipeline

    def load(cfg, device):
        if "pipe" not in cache:
            cache["pipe"] = original(cfg, device)
            cache["scheduler"] = cache["pipe"].scheduler
        cache["pipe"].scheduler = cache["scheduler"]
        return cache["pipe"]

    monkeypatch.setattr(inpaint, "load_pipeline", load)
    cache["original"] = original
    return cache


def _cfg(compose, files, *overrides):
    base = [
        f"image={files / 'room.jpg'}",
        f"mask={files / 'room_mask.png'}",
        "prompt=a photo of sks red can",
        "model=tiny",
        "steps=2",
        f"run_dir={files / 'run'}",
        "progress=false",
    ]
    return compose("inpaint", base + list(overrides))


def _far_from_mask():
    """Pixels farther than 2 × feather_radius (with ``dif.feather_radius=2``) from the mask box: the
    final composite keeps them bit-identical to the (8-bit RGB) input."""
    far = np.ones((H, W), bool)
    far[20 - 4 : 44 + 4, 30 - 4 : 60 + 4] = False
    return far


def test_config_defaults(compose, files):
    cfg = _cfg(compose, files)
    assert cfg.dif.lambda_ == 0.7 and list(cfg.tas.stages) == ["local", "global"] and cfg.tas.enabled
    assert cfg.lora is None and cfg.num_images == 1 and cfg.out == f"{files / 'run'}/inpainted.png"
    assert compose("inpaint", ["image=a", "mask=b", "prompt=c", "run_dir=/tmp/x"]).model.name == "sdxl_inpaint"


def test_writes_an_input_sized_png_and_a_grid(compose, files, cached_pipeline):
    from dreammix.inpaint import run_inpaint

    written = run_inpaint(_cfg(compose, files, "save_grid=true", "dif.feather_radius=2"))
    out, grid = files / "run" / "inpainted.png", files / "run" / "inpainted_grid.png"
    assert written == [out, grid]
    final = np.asarray(Image.open(out))
    assert final.shape == (H, W, 3) and Image.open(grid).size == (4 * W, H)
    x = np.asarray(load_image(files / "room.jpg"))
    far = _far_from_mask()
    assert np.array_equal(final[far], x[far])
    assert not np.array_equal(final[20:44, 30:60], x[20:44, 30:60])
    assert not list((files / "run").glob(".*tmp"))  # atomic writes leave no temp files


def test_num_images_writes_numbered_files(compose, files, cached_pipeline):
    from dreammix.inpaint import run_inpaint

    written = run_inpaint(_cfg(compose, files, "num_images=2", f"out={files / 'o' / 'res.png'}"))
    assert written == [files / "o" / "res_0.png", files / "o" / "res_1.png"]
    a, b = (np.asarray(Image.open(p)) for p in written)
    assert a.shape == b.shape == (H, W, 3) and not np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_image_files_of_any_mode_are_converted(compose, files, cached_pipeline, mode):
    from dreammix.inpaint import run_inpaint

    rgb = Image.open(files / "room.jpg").convert("RGB")
    path = files / ("im.jpg" if mode == "CMYK" else "im.png")
    rgb.convert(mode).save(path)  # RGBA: opaque, so no compositing on white
    (out,) = run_inpaint(_cfg(compose, files, f"image={path}", "dif.feather_radius=2"))
    assert Image.open(out).size == (W, H) and Image.open(out).mode == "RGB"
    far = _far_from_mask()  # there the result is the input as PIL converts it to RGB
    assert np.array_equal(np.asarray(Image.open(out))[far], np.asarray(Image.open(path).convert("RGB"))[far])


def test_16_bit_image_keeps_its_values(compose, files, cached_pipeline):
    """A 16-bit grayscale input is rescaled from its 0…65535 range to 8 bits (x · 255/65535, rounded),
    not clipped or shifted: outside the mask the written result is exactly that conversion."""
    from dreammix.inpaint import run_inpaint

    rng = np.random.default_rng(16)
    x16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)  # full range, mostly not multiples of 257
    image = Image.fromarray(x16)
    assert image.mode.startswith("I;16")
    image.save(files / "im16.png")
    (out,) = run_inpaint(_cfg(compose, files, f"image={files / 'im16.png'}", "dif.feather_radius=2"))
    final = np.asarray(Image.open(out))
    assert final.shape == (H, W, 3)
    expected = np.floor(x16.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)  # x/257 never ends in .5
    far = _far_from_mask()
    for channel in range(3):
        assert np.array_equal(final[..., channel][far], expected[far])


def test_rgb_jpeg_and_wrong_size_masks(compose, files, cached_pipeline):
    from dreammix.inpaint import run_inpaint

    mask = np.asarray(Image.open(files / "room_mask.png"))
    rgb_jpeg = files / "mask_rgb.jpg"
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(rgb_jpeg, quality=60)  # lossy, RGB
    ref = np.asarray(Image.open(run_inpaint(_cfg(compose, files, "out=" + str(files / "a.png")))[0]))
    got = np.asarray(Image.open(run_inpaint(_cfg(compose, files, f"mask={rgb_jpeg}", "out=" + str(files / "b.png")))[0]))
    assert np.array_equal(got, ref)  # thresholded back to the same binary mask

    big = files / "mask_big.png"
    Image.fromarray(mask).resize((2 * W, 2 * H), Image.NEAREST).save(big)
    with pytest.warns(UserWarning, match="resizing the mask"):
        (out,) = run_inpaint(_cfg(compose, files, f"mask={big}", "out=" + str(files / "c.png")))
    assert Image.open(out).size == (W, H)


def _write(path, content):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "override,match",
    [
        ("image={d}/missing.jpg", "file not found \\(image="),
        ("mask={d}/missing.png", "file not found \\(mask="),
        ("lora={d}/no_such_run/lora", "LoRA folder not found \\(lora="),
        ("lora={d}", "LoRA folder has no pytorch_lora_weights.safetensors"),
        ("mask={d}/empty.png", "mask is empty"),
        ("image={d}/broken.jpg", "cannot read image"),
        ("dif.lambda_=1.5", "must be in \\[0, 1\\]"),
        ("scheduler=heun", "unknown scheduler"),
        ("out={d}/result.jpg", "must be a .png"),
        ("steps=many", "expected int"),
    ],
)
def test_bad_input_is_one_line_error_before_loading_the_model(compose, files, monkeypatch, override, match):
    import dreammix.inpaint as inpaint

    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: pytest.fail("model loaded before input was checked"))
    Image.fromarray(np.zeros((H, W), np.uint8)).save(files / "empty.png")
    _write(files / "broken.jpg", b"not a jpeg")
    override = override.format(d=files)
    with pytest.raises(DreamMixError, match=match) as err:
        inpaint.run_inpaint(_cfg(compose, files, override))
    assert "\n" not in str(err.value)


def test_tas_words_need_sks_and_come_from_the_dictionary(compose, files, monkeypatch):
    import dreammix.inpaint as inpaint

    monkeypatch.setattr(inpaint, "load_pipeline", lambda *a: pytest.fail("model loaded before input was checked"))
    with pytest.raises(DreamMixError, match="'sks'") as err:
        inpaint.run_inpaint(_cfg(compose, files, "prompt=a red can", "tas.eliminate=[blue]"))
    assert err.value.where == "prompt"

    def words(*overrides, prompt="a sks red can"):
        return inpaint.resolve_eliminate(_cfg(compose, files, *overrides), prompt)

    assert words("tas.eliminate=[blue, silver]") == ["blue", "silver"]
    assert words() == []  # no dictionary: nothing to eliminate, no error
    assert words("subject=can") == ["blue", "silver", "yellow", "black"]  # red is a new color
    assert words("subject=can", "tas.enabled=false") == []
    assert words("subject=can", prompt="a photo of sks can") == []
    attrs = files / "attributes.json"
    attrs.write_text(json.dumps({"color": ["green"], "material": ["glass"]}))
    assert words(f"tas.attributes={attrs}", prompt="a sks wooden can") == ["glass"]
    with pytest.raises(DreamMixError, match="'sks'"):
        words("subject=can", prompt="a red can")




def test_lora_run_differs_from_the_base_model_and_lora_scale_0_is_the_base(compose, files, tiny_model_dir, cached_pipeline):
    """The subject LoRA changes the result; ``lora_scale`` scales its update (W + scale·α/r·BA), so at
    0 the result is exactly the base model's."""
    import dreammix.inpaint as inpaint

    lora_dir = make_real_lora(tiny_model_dir, files / "train_run" / "lora")
    (base,) = inpaint.run_inpaint(_cfg(compose, files, "out=" + str(files / "base.png")))
    # fresh pipelines for the LoRA runs: the shared one must stay adapter-free
    inpaint.load_pipeline = cached_pipeline["original"]
    (lora,) = inpaint.run_inpaint(_cfg(compose, files, f"lora={lora_dir}", "out=" + str(files / "lora.png")))
    (off,) = inpaint.run_inpaint(_cfg(compose, files, f"lora={lora_dir}", "lora_scale=0", "out=" + str(files / "off.png")))
    base, lora, off = (np.asarray(Image.open(p)) for p in (base, lora, off))
    assert not np.array_equal(base, lora)
    assert np.array_equal(off, base)


def _lora_scalings(unet, adapter):
    """``{layer: scaling}`` of every peft LoRA layer of ``adapter`` in ``unet``."""
    return {name: m.scaling[adapter] for name, m in unet.named_modules() if adapter in getattr(m, "scaling", {})}


def test_every_config_key_reaches_the_pipeline(compose, files, tiny_model_dir, cached_pipeline, monkeypatch):
    """Each dif.* / tas.* / sampling key of ``inpaint.yaml``, set to a non-default value, is what
    ``DreamMixInpaintPipeline.__call__`` receives (the scheduler and the LoRA's weight: what the
    pipeline holds at the call); ``tas.enabled=false`` turns TAS off even with words given."""
    import dreammix.inpaint as inpaint
    from diffusers import DDIMScheduler

    from dreammix.pipeline import LORA_ADAPTER, DreamMixInpaintPipeline

    calls = []
    real_call = DreamMixInpaintPipeline.__call__

    def spy(self, *args, **kwargs):
        bound = inspect.signature(real_call).bind(self, *args, **kwargs)
        bound.apply_defaults()  # an argument left out counts as its default
        got = dict(bound.arguments)
        calls.append({**got, "seed": got["generator"].initial_seed(), "scheduler": self.scheduler,
                      "scalings": _lora_scalings(self.unet, LORA_ADAPTER)})  # fmt: skip
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DreamMixInpaintPipeline, "__call__", spy)
    lora_dir = make_real_lora(tiny_model_dir, files / "train_run" / "lora")

    # TAS off: no words reach the pipeline although tas.eliminate names some (shared base pipeline)
    inpaint.run_inpaint(_cfg(compose, files, "tas.enabled=false", "tas.eliminate=[blue]", f"out={files / 'notas.png'}"))
    assert not calls[-1]["eliminate"]

    monkeypatch.setattr(inpaint, "load_pipeline", cached_pipeline["original"])  # the LoRA goes into a fresh one
    inpaint.run_inpaint(_cfg(
        compose, files, f"lora={lora_dir}", "lora_scale=0.5", "dif.lambda_=0.4", "dif.crop_scale=1.6",
        "dif.min_crop_frac=0.8", "dif.blend=false", "dif.feather_radius=3", "tas.eliminate=[blue, silver]",
        "tas.stages=[local]", "guidance_scale=2.5", "negative_prompt=blurry photo", "steps=3", "seed=7",
        "scheduler=ddim", f"out={files / 'keys.png'}",
    ))  # fmt: skip
    got = calls[-1]
    assert got["prompt"] == "a photo of sks red can" and got["negative_prompt"] == "blurry photo"
    assert (got["lambda_"], got["crop_scale"], got["min_crop_frac"]) == (0.4, 1.6, 0.8)
    assert got["blend"] is False and got["feather_radius"] == 3
    assert list(got["eliminate"]) == ["blue", "silver"] and list(got["tas_stages"]) == ["local"]
    assert (got["guidance_scale"], got["num_inference_steps"], got["seed"]) == (2.5, 3, 7)
    assert type(got["scheduler"]) is DDIMScheduler
    # the LoRA's update weight in every adapted layer: lora_scale · alpha / rank (peft's scaling)
    assert got["scalings"] and set(got["scalings"].values()) == {0.5 * LORA_ALPHA / LORA_RANK}


def _cli(args, cwd, **env):
    # one intra-op thread: tiny models on a shared CPU run several times faster (no spin-waits)
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "src" / "inpaint.py"), *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_bad_lora_exits_2_with_one_line(files):
    result = _cli(
        [f"image={files / 'room.jpg'}", f"mask={files / 'room_mask.png'}", "prompt=a sks red can",
         f"lora={files / 'nope'}", "model=tiny"],
        cwd=files,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: LoRA folder not found (lora={files / 'nope'})"]


def test_cli_end_to_end(files, tiny_model_dir):
    result = _cli(
        [f"image={files / 'room.jpg'}", f"mask={files / 'room_mask.png'}", "prompt=a sks red can",
         "model=tiny", "steps=2", "save_grid=true", "num_images=2", f"out={files / 'cli' / 'x.png'}",
         f"lora={make_real_lora(tiny_model_dir, files / 'train_run' / 'lora')}"],
        cwd=files, DREAMMIX_CACHE=str(tiny_model_dir.parent),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (files / "cli").iterdir()) == ["x_0.png", "x_0_grid.png", "x_1.png", "x_1_grid.png"]
    assert Image.open(files / "cli" / "x_1.png").size == (W, H)
