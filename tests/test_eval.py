"""evaluate(cfg): generation → images on disk → scores from disk, resume after crashes, settings
guard, summaries, W&B table, sweeps. Synthetic benchmark made in code (no shared data needed).

Most tests use a stub pipeline and a stub metric suite (instant, with known outputs), which is what
the resume/record logic is about; one test runs the real tiny SDXL pipeline and tiny CLIP/DINO.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import LORA_ALPHA, LORA_RANK, make_real_lora
from dreammix.benchmark.manifest import Case, write_manifest
from dreammix.errors import DreamMixError
from dreammix.evaluate import (
    RECORDS_NAME,
    RUN_INFO_NAME,
    SCORE_KEYS,
    evaluate,
    score_real_images,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# synthetic benchmark
# ------------------------------------------------------------------------------------------------


def make_bench(root: Path, subjects=("thing", "other"), backgrounds=3) -> Path:
    """A manifest with ``backgrounds`` × 2 tasks cases per subject, random backgrounds, box masks."""
    rng = np.random.default_rng(0)
    (root / "bg").mkdir(parents=True)
    (root / "masks").mkdir()
    cases = []
    for b in range(backgrounds):
        w, h = 96 + 8 * b, 80
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "bg" / f"{b}.png")
        box = [10 + b, 12, 50 + b, 60]
        mask = np.zeros((h, w), np.uint8)
        mask[box[1] : box[3], box[0] : box[2]] = 255
        Image.fromarray(mask).save(root / "masks" / f"{b}.png")
        for subject in subjects:
            for task, prompt in (("identity", f"a photo of sks {subject}"), ("attribute", f"a red sks {subject}")):
                cases.append(Case(
                    case_id=f"{subject}-{task}-{b}", subject=subject, class_noun=subject, task=task, prompt=prompt,
                    prompt_index=0, image=f"bg/{b}.png", image_id=b, ann_id=b, category="cup", box=box, width=w,
                    height=h, mask=f"masks/{b}.png", seed=100 + b,
                ))  # fmt: skip
    write_manifest(root / "manifest.jsonl", cases)
    return root / "manifest.jsonl"


def make_subject(root: Path, n=3) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (60 * i, 120, 30)).save(root / f"{i:02d}.png")
    return root


def make_lora(root: Path, loss: dict) -> Path:
    """A folder that looks like train()'s LoRA output (weights content is irrelevant to stubs)."""
    root.mkdir(parents=True)
    save_file({"unet.x.lora.down.weight": torch.zeros(1, 1)}, str(root / "pytorch_lora_weights.safetensors"))  # read
    # (finite, readable) before any model; its values are not used by the stub pipeline
    (root / RUN_INFO_NAME).write_text(json.dumps({"loss": loss}))
    return root


@pytest.fixture
def bench(tmp_path):
    return SimpleNamespace(
        manifest=make_bench(tmp_path / "bench"), refs=make_subject(tmp_path / "refs"),
        lora=make_lora(tmp_path / "lora", {"tau_in": 1.5, "tau_out": 0.7, "beta": 0.4}),
    )  # fmt: skip


def eval_cfg(compose, tmp_path, bench, run="run", *extra):
    return compose(
        "eval",
        [
            "model=tiny", "metrics=tiny", "logger=none", "device=cpu", "metrics.device=cpu", "steps=2",
            f"manifest={bench.manifest}", f"lora_dir={bench.lora}", f"run_dir={tmp_path / run}",
            "subject=custom", "subject.name=thing", "subject.class_noun=thing", f"subject.image_dir={bench.refs}",
            "++subject.attributes={color:[blue,silver]}", "fid_extractor=color_stats",
            f"metrics.fid.reference_dir={bench.manifest.parent / 'bg'}", "metrics.fid.num_workers=0",
            "metrics.fid.cache_dir=null", *extra,
        ],
    )  # fmt: skip


class Crash(RuntimeError):
    pass


class StubPipe:
    """Fills the mask with a colour from the seed; records calls and prompt encodings; crashes on
    call ``crash_at``."""

    text_encoder = text_encoder_2 = None

    def __init__(self, crash_at=None):
        self.calls: list[dict] = []
        self.encoded: list[dict] = []
        self.crash_at = crash_at

    def encode_conditions(self, **text):
        self.encoded.append(text)
        return ("conditions", text["prompt"], tuple(text["eliminate"]))

    def __call__(self, image, mask_image, prompt, generator, **kwargs):
        if self.crash_at is not None and len(self.calls) + 1 == self.crash_at:
            raise Crash("simulated crash")
        self.calls.append({"prompt": prompt, "seed": generator.initial_seed(), **kwargs})
        arr = np.asarray(image).copy()
        arr[np.asarray(mask_image) > 0] = generator.initial_seed() % 256
        return SimpleNamespace(images=[Image.fromarray(arr)])


class StubSuite:
    """clip_i = mean pixel of the image / 255 (so scores come from the file on disk)."""

    def __init__(self, crash_on_batch=None):
        self.batches = 0
        self.crash_on_batch = crash_on_batch

    def score(self, images, boxes, prompts, references):
        self.batches += 1
        if self.batches == self.crash_on_batch:
            raise Crash("simulated crash while scoring")
        out = []
        for im in images:
            v = float(np.asarray(im).mean() / 255.0)
            out.append({k: v for k in SCORE_KEYS})
        return out


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------


def test_resume_after_crashes_regenerates_nothing_and_counts_nothing_twice(compose, tmp_path, bench):
    cfg = eval_cfg(compose, tmp_path, bench, "run", "score_batch_size=2")
    # 1. crash while generating the 3rd of 6 cases: two images are on disk, nothing scored
    pipe = StubPipe(crash_at=3)
    with pytest.raises(Crash):
        evaluate(cfg, pipe_factory=lambda c: pipe, metric_suite=StubSuite())
    images = sorted(p.name for p in (tmp_path / "run" / "images").glob("*.png"))
    assert images == ["thing-attribute-0.png", "thing-identity-0.png"]  # manifest order: bg 0, both tasks
    assert not list((tmp_path / "run" / "images").glob(".*"))  # no temp files left behind
    # 2. resume, crash while scoring the 2nd batch: the first batch's records stay
    pipe2 = StubPipe()
    with pytest.raises(Crash):
        evaluate(cfg, pipe_factory=lambda c: pipe2, metric_suite=StubSuite(crash_on_batch=2))
    assert len(pipe2.calls) == 4  # only the 4 missing images
    records = tmp_path / "run" / RECORDS_NAME
    assert len(records.read_text().splitlines()) == 2
    # 3. a torn last line (killed mid-append) is dropped and that case scored again
    with records.open("a") as handle:
        handle.write('{"case_id": "thing-identity-1", "clip_')
    pipe3 = StubPipe()
    with pytest.warns(UserWarning, match="incomplete last record"):
        result = evaluate(cfg, pipe_factory=lambda c: pipe3, metric_suite=StubSuite())
    assert pipe3.calls == [] and result.generated == 0 and result.scored == 4
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["case_id"] for r in lines) == sorted(
        f"thing-{t}-{b}" for t in ("identity", "attribute") for b in range(3)
    )  # every case exactly once, none of subject "other"
    assert result.summary["tasks"]["identity"]["n"] == 3 and result.summary["tasks"]["all"]["n"] == 6
    # 4. a finished run reruns without generating or scoring anything
    again = evaluate(cfg, pipe_factory=lambda c: StubPipe(crash_at=1), metric_suite=StubSuite(crash_on_batch=1))
    assert (again.generated, again.scored) == (0, 0) and again.summary["tasks"] == result.summary["tasks"]

    # The interrupted run equals an uninterrupted one: same images, same records.
    straight = evaluate(eval_cfg(compose, tmp_path, bench, "straight"), pipe_factory=lambda c: StubPipe(), metric_suite=StubSuite())
    for record in straight.records:
        a = np.asarray(Image.open(tmp_path / "straight" / record["image"]))
        b = np.asarray(Image.open(tmp_path / "run" / record["image"]))
        assert np.array_equal(a, b)
    assert [{k: r[k] for k in SCORE_KEYS} for r in straight.records] == [{k: r[k] for k in SCORE_KEYS} for r in result.records]


def test_generation_uses_each_cases_seed_prompt_and_tas_words(compose, tmp_path, bench):
    pipe = StubPipe()
    result = evaluate(eval_cfg(compose, tmp_path, bench, "run", "tasks=[attribute]", "limit=2"),
                      pipe_factory=lambda c: pipe, metric_suite=StubSuite())  # fmt: skip
    assert [c["prompt"] for c in pipe.calls] == ["a red sks thing"] * 2
    assert [c["seed"] for c in pipe.calls] == [100, 101]
    # experiment=dif_tas_adm (default): λ 0.7, TAS on, the subject's other colours eliminated
    assert all(c["lambda_"] == 0.7 and c["eliminate"] == ["blue", "silver"] for c in pipe.calls)
    assert [r["eliminate"] for r in result.records] == [["blue", "silver"]] * 2
    pipe = StubPipe()
    evaluate(eval_cfg(compose, tmp_path, bench, "base", "experiment=baseline", "check_lora=off"),
             pipe_factory=lambda c: pipe, metric_suite=StubSuite())  # fmt: skip
    assert all(c["lambda_"] == 0.0 and c["eliminate"] == [] for c in pipe.calls)


#: Non-default values of every generation key of eval.yaml (dif.*, tas.*, sampling), as overrides
#: and as what the pipeline call must receive.
KEYS = ["steps=3", "dif.lambda_=0.4", "dif.crop_scale=1.6", "dif.min_crop_frac=0.8", "dif.blend=false",
        "dif.feather_radius=3", "tas.stages=[local]", "guidance_scale=2.5", "negative_prompt=blurry photo"]  # fmt: skip
EXPECTED_CALL = dict(num_inference_steps=3, lambda_=0.4, crop_scale=1.6, min_crop_frac=0.8, blend=False, feather_radius=3,
                     tas_stages=["local"], guidance_scale=2.5, negative_prompt="blurry photo")  # fmt: skip


def test_every_generation_key_reaches_the_pipeline_call(compose, tmp_path, bench):
    """Each dif.* / tas.* / sampling key, set to a non-default value, is what every pipeline call of
    the benchmark gets (with the case's own seed and TAS words); tas.enabled=false sends no words."""
    pipe = StubPipe()
    evaluate(eval_cfg(compose, tmp_path, bench, "run", "tasks=[attribute]", "limit=2", *KEYS),
             pipe_factory=lambda c: pipe, metric_suite=StubSuite())  # fmt: skip
    assert len(pipe.calls) == 2 and [c["seed"] for c in pipe.calls] == [100, 101]
    for call in pipe.calls:
        assert {k: call[k] for k in EXPECTED_CALL} == EXPECTED_CALL
        assert call["eliminate"] == ["blue", "silver"] and call["prompt"] == "a red sks thing"
    pipe = StubPipe()
    evaluate(eval_cfg(compose, tmp_path, bench, "off", "tasks=[attribute]", "limit=1", "tas.enabled=false",
                      "tas.eliminate=[blue]"), pipe_factory=lambda c: pipe, metric_suite=StubSuite())  # fmt: skip
    assert [c["eliminate"] for c in pipe.calls] == [[]]


def test_resume_with_other_settings_is_refused(compose, tmp_path, bench):
    evaluate(eval_cfg(compose, tmp_path, bench, "run", "limit=1"), pipe_factory=lambda c: StubPipe(), metric_suite=StubSuite())
    with pytest.raises(DreamMixError, match="cannot resume into this run_dir: dif"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", "limit=1", "dif.lambda_=0.3"), pipe_factory=lambda c: StubPipe())
    with pytest.raises(DreamMixError, match=f"delete {RECORDS_NAME} to rescore"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", "limit=1", "metrics.crop_scale=1.5"), pipe_factory=lambda c: StubPipe())
    # More cases (limit removed) with the same settings is a legitimate continuation.
    result = evaluate(eval_cfg(compose, tmp_path, bench, "run"), pipe_factory=lambda c: StubPipe(), metric_suite=StubSuite())
    assert (result.generated, result.scored, len(result.records)) == (4, 4, 6)


def test_lora_trained_for_another_row_warns_or_fails(compose, tmp_path, bench, caplog):
    dreambooth = make_lora(tmp_path / "db", {"tau_in": 1.0, "tau_out": 1.0, "beta": 0.0})
    cfg = eval_cfg(compose, tmp_path, bench, "run", f"lora_dir={dreambooth}", "check_lora=error")
    with pytest.raises(DreamMixError, match="trained with tau_in=1.0.*expects tau_in=1.5"):
        evaluate(cfg, pipe_factory=lambda c: StubPipe())
    # the DreamBooth rows accept it
    evaluate(eval_cfg(compose, tmp_path, bench, "run", f"lora_dir={dreambooth}", "check_lora=error", "experiment=dif", "limit=1"),
             pipe_factory=lambda c: StubPipe(), metric_suite=StubSuite())  # fmt: skip


def test_bad_inputs_fail_before_any_model(compose, tmp_path, bench):
    never = lambda c: pytest.fail("the model must not load")  # noqa: E731
    with pytest.raises(DreamMixError, match="LoRA folder not found"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", f"lora_dir={tmp_path / 'nope'}"), pipe_factory=never)
    with pytest.raises(DreamMixError, match="no case of subject 'nobody'"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", "subject.name=nobody"), pipe_factory=never)
    with pytest.raises(DreamMixError, match="unknown task"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", "tasks=[identity,editing]"), pipe_factory=never)
    with pytest.raises(DreamMixError, match="manifest not found"):
        evaluate(eval_cfg(compose, tmp_path, bench, "run", f"manifest={tmp_path / 'x.jsonl'}"), pipe_factory=never)


# ------------------------------------------------------------------------------------------------
# scores and summaries
# ------------------------------------------------------------------------------------------------


def test_summarize_means_per_task_and_subject():
    rows = []
    for subject, values in (("a", [0.1, 0.3]), ("b", [0.5])):
        for i, v in enumerate(values):
            rows.append({"case_id": f"{subject}{i}", "subject": subject, "task": "identity", **{k: v for k in SCORE_KEYS}})
    rows.append({"case_id": "c", "subject": "a", "task": "attribute", **{k: 1.0 for k in SCORE_KEYS}})
    s = summarize(rows)
    assert s["identity"]["n"] == 3 and s["identity"]["mean"]["clip_i"] == pytest.approx(0.3)
    assert s["identity"]["per_subject"]["a"]["mean"]["dino"] == pytest.approx(0.2)
    assert s["attribute"]["mean"]["clip_t"] == 1.0 and s["all"]["n"] == 4


def test_real_images_row_excludes_self_pairs():
    e = torch.eye(3)
    feats = torch.stack([e[0], e[1], (e[0] + e[1]) / 2**0.5])
    # pairwise cosines: (0,1)=0, (0,2)=(1,2)=1/sqrt2 → off-diagonal mean = 2*(0+2/sqrt2)/6
    clip = SimpleNamespace(reference_features=lambda p: feats,
                           clip_t=lambda f, texts, ident: torch.full((len(texts),), 0.25) if texts == ["a photo of can"] * 3 else None)  # fmt: skip
    suite = SimpleNamespace(clip=clip, dino=SimpleNamespace(reference_features=lambda p: feats), identifier="sks")
    got = score_real_images(suite, ["a", "b", "c"], "can")
    expected = (2 / 2**0.5) * 2 / 6
    assert got["clip_i"] == pytest.approx(expected) and got["dino"] == pytest.approx(expected)
    assert got["clip_t"] == pytest.approx(0.25) and got["n"] == 3




def reference_scorer(references, metrics_cfg):
    """CLIP-I / CLIP-T / DINO of a generated image recomputed with transformers and torchvision from
    their definitions (paper §4.1, DreamBooth protocol): crop = the square of side max(box w, h)
    centred on the box; CLIP-I / DINO = mean cosine with every reference image; CLIP-T = cosine with
    the prompt without ``sks``; DINO = CLS token after Resize(bicubic) + CenterCrop + ImageNet norm."""
    from torchvision import transforms
    from transformers import CLIPModel, CLIPProcessor, ViTModel

    refs = [Image.open(r).convert("RGB") for r in references]
    unit = lambda f: f / f.norm(dim=-1, keepdim=True)  # noqa: E731
    clip = CLIPModel.from_pretrained(str(metrics_cfg.clip.model)).eval()
    processor = CLIPProcessor.from_pretrained(str(metrics_cfg.clip.model))
    dino = ViTModel.from_pretrained(str(metrics_cfg.dino.model), add_pooling_layer=False).eval()
    to_dino = transforms.Compose([
        transforms.Resize(int(metrics_cfg.dino.resize), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(int(metrics_cfg.dino.crop)), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip

    def scores(image: Image.Image, box, prompt: str) -> dict[str, float]:
        x0, y0, x1, y1 = box
        side = max(x1 - x0, y1 - y0)
        left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
        assert 0 <= left and 0 <= top and left + side <= image.width and top + side <= image.height  # no shift needed
        crop = image.crop((left, top, left + side, top + side))
        with torch.no_grad():
            out = clip(**processor(text=[prompt.replace("sks ", "")], images=[crop, image, *refs], return_tensors="pt", padding=True))
            img, txt = unit(out.image_embeds), unit(out.text_embeds)[0]
            cls = unit(dino(pixel_values=torch.stack([to_dino(im) for im in [crop, image, *refs]])).last_hidden_state[:, 0])
        result = {}
        for i, suffix in ((0, ""), (1, "_full")):
            result["clip_i" + suffix] = float((img[2:] @ img[i]).mean())
            result["clip_t" + suffix] = float(img[i] @ txt)
            result["dino" + suffix] = float((cls[2:] @ cls[i]).mean())
        return result

    return scores


def test_real_tiny_models_end_to_end_equal_direct_pipeline_calls_and_scores(compose, tmp_path, bench, tiny_model_dir):
    """The production path — tiny SDXL pipeline with a real subject LoRA, tiny CLIP/DINO, colour-stats
    FID, W&B offline — with every generation key non-default: each written image equals a direct
    pipeline call for its case (seed, TAS words, the configured values; the LoRA put in with diffusers'
    own load_lora_weights/set_adapters at lora_scale), and each record's six scores equal the cosines
    recomputed from the written image with transformers."""
    from diffusers import DDIMScheduler, StableDiffusionXLInpaintPipeline

    from dreammix.evaluate import load_eval_pipeline
    from dreammix.pipeline import LORA_ADAPTER, DreamMixInpaintPipeline

    lora = make_real_lora(tiny_model_dir, tmp_path / "real_lora")
    cfg = eval_cfg(compose, tmp_path, bench, "run", f"lora_dir={lora}", "lora_scale=0.5", "scheduler=ddim", *KEYS,
                   f"model.pretrained={tiny_model_dir}", "logger=wandb", "tasks=[attribute]", "limit=2", "wandb_rows=2")  # fmt: skip
    loaded = []
    result = evaluate(cfg, pipe_factory=lambda c: loaded.append(load_eval_pipeline(c)) or loaded[-1])
    run = tmp_path / "run"
    assert result.generated == 2 and result.scored == 2
    (pipe,) = loaded
    assert type(pipe.scheduler) is DDIMScheduler
    scalings = {m.scaling[LORA_ADAPTER] for m in pipe.unet.modules() if LORA_ADAPTER in getattr(m, "scaling", {})}
    assert scalings == {0.5 * LORA_ALPHA / LORA_RANK}  # peft: lora_scale · alpha / rank

    ref = DreamMixInpaintPipeline.from_base(StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir))
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(str(lora), adapter_name="ref")
    ref.set_adapters(["ref"], adapter_weights=[0.5])
    ref.set_progress_bar_config(disable=True)
    bg = bench.manifest.parent
    reference_scores = reference_scorer(sorted(bench.refs.iterdir()), cfg.metrics)
    for b, record in enumerate(result.records):
        assert record["case_id"] == f"thing-attribute-{b}" and record["eliminate"] == ["blue", "silver"]
        background = Image.open(bg / "bg" / f"{b}.png").convert("RGB")
        expected = ref(
            image=background, mask_image=np.asarray(Image.open(bg / "masks" / f"{b}.png")) > 127, prompt="a red sks thing",
            eliminate=["blue", "silver"], generator=torch.Generator("cpu").manual_seed(100 + b), **EXPECTED_CALL,
        ).images[0]  # fmt: skip
        written = Image.open(run / record["image"])
        assert written.size == background.size
        assert np.array_equal(np.asarray(written), np.asarray(expected))
        scores = reference_scores(written.convert("RGB"), record["box"], record["prompt"])
        assert {k: record[k] for k in SCORE_KEYS} == pytest.approx(scores, abs=1e-5)
    # one task only: its FID is the overall one (FID itself: test_metrics.py)
    assert set(result.fid) == {"attribute", "all"} and np.isfinite(result.fid["all"])
    assert result.fid["attribute"] == pytest.approx(result.fid["all"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tasks"]["attribute"]["mean"]["clip_i"] == pytest.approx(np.mean([r["clip_i"] for r in result.records]))
    assert "| attribute | 2 |" in (run / "summary.md").read_text()
    # W&B offline run with the cases table (2 rows, thumbnails) in the run dir
    tables = list(run.glob("wandb/offline-run-*/files/media/table/eval/cases_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    # (wandb 0.31 stages a table's images in the run's artifact; the table file holds the rows)
    assert len(table["data"]) == 2 and {"result", "crop", "clip_i", "prompt"} <= set(table["columns"])


def test_multirun_sweep_collects_one_results_table(tmp_path, bench, tiny_model_dir):
    """`python src/eval.py -m dif.lambda_=0,1`: one job per value, results.md lists both."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, str(REPO / "src" / "eval.py"), "-m", "model=tiny", f"model.pretrained={tiny_model_dir}",
        "metrics=tiny", "logger=none", "device=cpu", "metrics.device=cpu", "steps=1", "limit=1", "fid=false",
        f"manifest={bench.manifest}", "lora_dir=null", "subject=custom", "subject.name=thing", "subject.class_noun=thing",
        f"subject.image_dir={bench.refs}", "dif.lambda_=0,1", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((sweep / "results.json").read_text())
    assert sorted(r["lambda"] for r in rows) == [0.0, 1.0]
    assert all(r["identity/n"] == 1 and r["attribute/n"] == 1 for r in rows)
    assert "| lambda |" in (sweep / "results.md").read_text()
    assert all(r["base"] == "tiny" for r in rows) and "| base |" in (sweep / "results.md").read_text()  # each job's base model


def test_cli_bad_input_is_one_line(tmp_path, bench):
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / "eval.py"), "model=tiny", "logger=none", f"manifest={bench.manifest}",
         "subject=custom", "subject.name=thing", "subject.class_noun=thing", f"subject.image_dir={bench.refs}",
         f"lora_dir={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: LoRA folder not found (lora_dir=")


@pytest.mark.parametrize("park", [True, False])
def test_prompts_are_encoded_once_ahead_when_text_encoders_are_parked(compose, tmp_path, bench, park):
    """park_text_encoders: each distinct prompt setting is encoded once before generation and every
    call gets its own prompt's conditions; off: the calls encode their prompts themselves."""
    pipe = StubPipe()
    evaluate(eval_cfg(compose, tmp_path, bench, "run", f"park_text_encoders={str(park).lower()}"),
             pipe_factory=lambda c: pipe, metric_suite=StubSuite())
    assert len(pipe.calls) == 6
    distinct = {(c["prompt"], tuple(c["eliminate"])) for c in pipe.calls}
    if park:
        assert sorted((e["prompt"], tuple(e["eliminate"])) for e in pipe.encoded) == sorted(distinct)
        assert all(c["conditions"] == ("conditions", c["prompt"], tuple(c["eliminate"])) for c in pipe.calls)
    else:
        assert pipe.encoded == [] and all(c["conditions"] is None for c in pipe.calls)
