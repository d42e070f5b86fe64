"""The inpainting web app (``python src/app.py``): logic here, the Gradio page in :func:`build_ui`.

A user uploads a photo, paints where each subject goes (one editor layer per region) or uploads a
mask, picks a trained subject (a LoRA folder found under ``conf/app.yaml``'s ``loras``), writes the
prompt, sets λ and the TAS words, and gets the LCG result, the final image(s) at the photo's own
size and the crop boxes. Everything the page does goes through :class:`InpaintApp`, which the tests
drive directly; the Gradio handlers only turn a :class:`DreamMixError` into a message in the page.

One pipeline serves every browser: Gradio's queue runs one generation at a time
(``default_concurrency_limit=1``), so the pipeline's per-call state and the adapter switches of one
request never meet another's. Each request writes its PNGs to its own folder under the run dir.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from omegaconf import DictConfig

from dreammix.errors import DreamMixError
from dreammix.lora_catalog import LoraEntry, find_loras, parse_words, read_lora_entry, same_base, suggested_eliminate
from dreammix.tas import IDENTIFIER, check_identifier

log = logging.getLogger(__name__)

MAX_REGIONS = 2
BASE_MODEL_CHOICE = ""  # the dropdown value of "no subject LoRA"
BOX_COLORS = ("#ff3b30", "#34c759")


@dataclass(frozen=True)
class AppSpec:
    """What ``conf/app.yaml`` configures: where LoRAs are looked for, the server, the defaults."""

    lora_roots: tuple[Path, ...]
    host: str
    port: int | None
    out_dir: Path
    steps: int
    guidance_scale: float
    lambda_: float
    seed: int
    max_images: int
    tas_stages: tuple[str, ...]
    crop_scale: float
    min_crop_frac: float
    blend: bool
    feather_radius: int | None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "AppSpec":
        from dreammix.cli import config_value

        roots = cfg.loras
        roots = [roots] if isinstance(roots, str) else list(roots or [])
        port = cfg.get("port")
        spec = cls(
            lora_roots=tuple(Path(str(r)).expanduser() for r in roots),
            host=str(cfg.host),
            port=None if port is None else config_value(cfg, "port", int),
            out_dir=Path(str(cfg.run_dir)),
            steps=config_value(cfg, "steps", int),
            guidance_scale=config_value(cfg, "guidance_scale", float),
            lambda_=config_value(cfg, "dif.lambda_", float),
            seed=config_value(cfg, "seed", int),
            max_images=config_value(cfg, "max_images", int),
            tas_stages=tuple(cfg.tas.stages),
            crop_scale=config_value(cfg, "dif.crop_scale", float),
            min_crop_frac=config_value(cfg, "dif.min_crop_frac", float),
            blend=bool(cfg.dif.blend),
            feather_radius=cfg.dif.get("feather_radius"),
        )
        if spec.host not in ("127.0.0.1", "localhost", "::1") and not cfg.get("allow_remote", False):
            raise DreamMixError(
                f"host {spec.host!r} would expose the app beyond this machine; set allow_remote=true to mean it", "host"
            )
        if spec.steps < 1 or spec.max_images < 1:
            raise DreamMixError("steps and max_images must be >= 1", "steps" if spec.steps < 1 else "max_images")
        return spec


@dataclass
class RegionRequest:
    """One region as the page sends it: a painted layer and/or an uploaded mask, subject, prompt."""

    layer: Any = None  # RGBA array of the editor layer (painted = opaque)
    mask_upload: Any = None  # an uploaded mask image (white = fill); wins over the layer
    lora: str | None = None
    prompt: str = ""
    words: str | Sequence[str] | None = None


@dataclass
class AppResult:
    finals: list[Path]
    lcg: list[PIL.Image.Image] | None
    boxes: PIL.Image.Image
    message: str


def layer_mask(layer: Any, size: tuple[int, int]) -> np.ndarray | None:
    """Binary (H, W) mask of the painted pixels of an editor layer (alpha ≥ half), at the photo's
    ``size = (w, h)`` (nearest, should the editor have shown the photo scaled); None if unpainted."""
    if layer is None:
        return None
    arr = np.asarray(layer)
    if arr.ndim == 3 and arr.shape[2] == 4:
        painted = arr[..., 3] >= 128
    elif arr.ndim == 3:
        painted = arr[..., :3].max(axis=-1) >= 128
    else:
        painted = arr >= 128
    return _at_size(painted, size)


def uploaded_mask(image: Any, size: tuple[int, int]) -> np.ndarray | None:
    """An uploaded mask image as a binary mask at ``size`` (white ≥ 50 % = fill, like mask files)."""
    if image is None:
        return None
    from dreammix.pipeline_inputs import _as_binary_mask

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:  # transparent = keep
        arr = arr[..., :3] * (arr[..., 3:] >= 128)
    return _at_size(_as_binary_mask(np.asarray(arr, np.uint8)) > 0.5, size)


def _at_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    if mask.shape != (size[1], size[0]):
        mask = np.asarray(PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize(size, PIL.Image.NEAREST)) >= 128
    return mask.astype(np.float32) if mask.any() else None


def draw_boxes(photo: PIL.Image.Image, boxes: Sequence[tuple[int, int, int, int]] | None) -> PIL.Image.Image:
    """The photo with each region's LCG crop m' outlined in its colour."""
    out = photo.convert("RGB").copy()
    draw = PIL.ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 200))
    for i, box in enumerate(boxes or []):
        left, top, right, bottom = box
        draw.rectangle((left, top, right - 1, bottom - 1), outline=BOX_COLORS[i % len(BOX_COLORS)], width=width)
    return out


class InpaintApp:
    """The app's behaviour without the page: subjects, TAS suggestions, validation, generation."""

    def __init__(self, spec: AppSpec, pipe, base_model: str, loras: Sequence[LoraEntry]):
        self.spec, self.pipe, self.base_model = spec, pipe, str(base_model)
        self.loras = {str(e.path): e for e in loras}

    def subject_choices(self) -> list[tuple[str, str]]:
        """Dropdown ``(label, value)`` pairs: each LoRA, then the base model alone."""
        return [(e.label, p) for p, e in self.loras.items()] + [("none (base model only)", BASE_MODEL_CHOICE)]

    def entry(self, lora: str | None) -> LoraEntry | None:
        if not lora:
            return None
        if lora not in self.loras:  # a folder typed by hand / added since start
            self.loras[lora] = read_lora_entry(lora)
        return self.loras[lora]

    def subject_info(self, lora: str | None) -> str:
        entry = self.entry(lora)
        return entry.describe() if entry else f"base model `{self.base_model}` without a subject LoRA"

    def default_prompt(self, lora: str | None) -> str:
        entry = self.entry(lora)
        return f"a photo of {entry.trigger}" if entry else "a photo"

    def suggest_words(self, lora: str | None, prompt: str) -> str:
        """The TAS words pre-filled for ``prompt``: the subject dictionary's same-category words."""
        return ", ".join(suggested_eliminate(self.entry(lora), prompt or ""))

    def check_base(self, entry: LoraEntry | None, where: str) -> None:
        if entry is not None and not same_base(entry, self.base_model):
            raise DreamMixError(
                f"this LoRA was trained on {entry.base_model}, but the app runs {self.base_model}; "
                "pick a subject trained on this model", where,
            )  # fmt: skip

    def generate(
        self,
        photo: Any,
        regions: Sequence[RegionRequest],
        *,
        lambda_: float,
        tas: bool,
        seed: int,
        steps: int,
        guidance_scale: float,
        num_images: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> AppResult:
        """Validate the request (a :class:`DreamMixError` with a sentence for the page), run
        :func:`dreammix.multi_region.inpaint_regions`, write the PNGs at the photo's size."""
        import torch

        from dreammix.atomic import atomic_save_image
        from dreammix.multi_region import Region, check_disjoint

        if photo is None:
            raise DreamMixError("upload a photo first", "photo")
        image = photo if isinstance(photo, PIL.Image.Image) else _load_photo(photo)
        size = image.size
        if not regions:
            raise DreamMixError("no region given", "regions")
        if not 1 <= int(num_images) <= self.spec.max_images:
            raise DreamMixError(f"number of images must be 1 … {self.spec.max_images}", "num_images")
        prepared = []
        for i, req in enumerate(regions):
            where = f"region {i + 1}"
            mask = uploaded_mask(req.mask_upload, size)
            if mask is None:
                mask = layer_mask(req.layer, size)
            if mask is None:
                raise DreamMixError(
                    f"no mask for {where}: paint where the subject goes on layer '{where.capitalize()}' "
                    "of the photo, or upload a mask", where,
                )  # fmt: skip
            prompt = (req.prompt or "").strip()
            if not prompt:
                raise DreamMixError(f"write a prompt for {where}", where)
            entry = self.entry(req.lora or None)
            self.check_base(entry, where)
            words = parse_words(req.words) if tas else []
            if tas and (words or (entry is not None and entry.attributes)):
                try:
                    check_identifier(prompt, IDENTIFIER)
                except DreamMixError as exc:
                    raise DreamMixError(
                        f"{where}: the prompt has no '{IDENTIFIER}'; TAS needs it to find the subject "
                        f"(write e.g. 'a {IDENTIFIER} {(entry.class_noun if entry else None) or 'dog'}', or turn TAS off)",
                        where,
                    ) from exc
            prepared.append(Region(mask, prompt, str(entry.path) if entry else None, 1.0, words))
        check_disjoint([r.mask for r in prepared])

        total = int(steps) * len(prepared)
        done = [0]

        def on_step(_pipe, _i, _t, kwargs):
            done[0] += 1
            if progress is not None:
                progress(done[0], total)
            return kwargs

        result = self.pipe.inpaint_regions(
            image, prepared,
            num_inference_steps=int(steps), guidance_scale=float(guidance_scale), lambda_=float(lambda_),
            tas_stages=self.spec.tas_stages if tas else (), num_images_per_prompt=int(num_images),
            generator=torch.Generator("cpu").manual_seed(int(seed)), crop_scale=self.spec.crop_scale,
            min_crop_frac=self.spec.min_crop_frac, blend=self.spec.blend, feather_radius=self.spec.feather_radius,
            callback_on_step_end=on_step,
        )  # fmt: skip
        folder = self.spec.out_dir / "generated" / uuid.uuid4().hex[:12]
        finals = []
        for i, final in enumerate(result.images):
            path = folder / f"dreammix_{i}.png"
            atomic_save_image(final, path)
            finals.append(path)
        subjects = ", ".join(self.entry(r.lora).subject if r.lora else "base model" for r in prepared)
        message = (
            f"{len(finals)} image(s) of {size[0]}×{size[1]} · {len(prepared)} region(s): {subjects} · "
            f"{result.lcg_steps} LCG + {int(steps) - result.lcg_steps} GCH steps per region · seed {int(seed)}"
        )
        return AppResult(finals, result.lcg_images, draw_boxes(image, result.crop_boxes), message)


def _load_photo(photo: Any) -> PIL.Image.Image:
    from dreammix.data.images import load_image
    from dreammix.pipeline_inputs import _as_rgb_array

    if isinstance(photo, (str, os.PathLike)):
        return load_image(photo)
    return PIL.Image.fromarray(_as_rgb_array(np.asarray(photo)))


# ---------------------------------------------------------------------------------------------- page
def build_ui(app: InpaintApp):
    """The Gradio page; every handler is one call into ``app``."""
    import gradio as gr

    spec = app.spec
    choices = app.subject_choices()
    first = choices[0][1]
    second = choices[1][1] if len(choices) > 2 else first  # another subject when there is one

    def page_error(fn):
        """A bad request becomes a message in the page (gr.Error), never a traceback."""

        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except DreamMixError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            except gr.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not take the page (or server) down
                log.exception("generation failed")
                raise gr.Error(f"internal error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

        return wrapped

    with gr.Blocks(title="DreamMix inpainting") as demo:
        gr.Markdown(
            "## DreamMix — put a trained subject into your photo\n"
            "Upload a photo, paint where the subject goes (layer *Region 1*; a second subject on layer "
            "*Region 2*), pick the subject, write the prompt with its trigger words, Generate."
        )
        with gr.Row():
            with gr.Column(scale=3):
                photo = gr.Image(label="Photo", type="filepath", sources=["upload"], elem_id="photo")
                editor = gr.ImageEditor(
                    label="Paint the mask(s)", type="numpy", sources=[], elem_id="editor",
                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=24),
                    layers=gr.LayerOptions(layers=["Region 1", "Region 2"], allow_additional_layers=False),
                    transforms=(), format="png",
                )  # fmt: skip
            with gr.Column(scale=2):
                with gr.Group():
                    subject1 = gr.Dropdown(choices, value=first, label="Subject (region 1)", elem_id="subject1")
                    info1 = gr.Markdown(app.subject_info(first))
                    prompt1 = gr.Textbox(app.default_prompt(first), label="Prompt (region 1)", elem_id="prompt1")
                    words1 = gr.Textbox(app.suggest_words(first, app.default_prompt(first)), label="TAS words (comma-separated)", elem_id="words1")
                    mask1 = gr.Image(label="…or upload a mask for region 1 (white = fill)", type="numpy", sources=["upload"], height=120)
                with gr.Accordion("Second region (optional)", open=False, elem_id="second"):
                    use2 = gr.Checkbox(False, label="Inpaint a second subject (layer Region 2)", elem_id="use2")
                    subject2 = gr.Dropdown(choices, value=second, label="Subject (region 2)")
                    info2 = gr.Markdown(app.subject_info(second))
                    prompt2 = gr.Textbox(app.default_prompt(second), label="Prompt (region 2)")
                    words2 = gr.Textbox(app.suggest_words(second, app.default_prompt(second)), label="TAS words (region 2)")
                    mask2 = gr.Image(label="…or upload a mask for region 2", type="numpy", sources=["upload"], height=120)
                lambda_ = gr.Slider(0.0, 1.0, spec.lambda_, step=0.05, label="λ (share of steps as local generation)", elem_id="lambda")
                tas = gr.Checkbox(True, label="TAS (remove the subject's conflicting attributes)")
                with gr.Row():
                    seed = gr.Number(spec.seed, precision=0, label="Seed")
                    steps = gr.Slider(1, 100, spec.steps, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    guidance = gr.Slider(0.0, 20.0, spec.guidance_scale, step=0.5, label="Guidance")
                    num_images = gr.Slider(1, spec.max_images, 1, step=1, label="Images")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            finals = gr.Gallery(label="Result", format="png", elem_id="finals", columns=2)
            lcg = gr.Gallery(label="LCG result (x^G)", format="png", columns=2)
            boxes = gr.Image(label="LCG crop box(es)", format="png")
        files = gr.File(label="Download (PNG at the photo's size)", file_count="multiple", elem_id="files")

        photo.change(lambda p: {"background": p, "layers": [], "composite": p} if p else None, photo, editor)
        for subject, info, prompt, words in ((subject1, info1, prompt1, words1), (subject2, info2, prompt2, words2)):
            subject.change(
                page_error(lambda lora: (app.subject_info(lora), app.default_prompt(lora), app.suggest_words(lora, app.default_prompt(lora)))),
                subject, [info, prompt, words],
            )  # fmt: skip
            prompt.blur(page_error(app.suggest_words), [subject, prompt], words)

        @page_error
        def run(photo_path, editor_value, s1, p1, w1, m1, second, s2, p2, w2, m2, lam, tas_on, seed_, steps_, cfg_, n,
                progress=gr.Progress()):  # fmt: skip
            layers = list((editor_value or {}).get("layers") or [])
            layers += [None] * (MAX_REGIONS - len(layers))
            regions = [RegionRequest(layers[0], m1, s1 or None, p1, w1)]
            if second:
                regions.append(RegionRequest(layers[1], m2, s2 or None, p2, w2))
            result = app.generate(
                photo_path, regions, lambda_=lam, tas=tas_on, seed=int(seed_ or 0), steps=int(steps_),
                guidance_scale=cfg_, num_images=int(n),
                progress=lambda done, total: progress((done, total), desc="denoising", unit="steps"),
            )  # fmt: skip
            paths = [str(p) for p in result.finals]
            return result.message, paths, result.lcg or [], result.boxes, paths

        generate.click(
            run,
            [photo, editor, subject1, prompt1, words1, mask1, use2, subject2, prompt2, words2, mask2,
             lambda_, tas, seed, steps, guidance, num_images],
            [status, finals, lcg, boxes, files],
            api_name="generate",
        )  # fmt: skip
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(app: InpaintApp, block: bool = True):
    """Serve the page on ``spec.host:spec.port``; ``block=False`` returns the running demo (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_ui(app)
    demo.launch(
        server_name=app.spec.host, server_port=app.spec.port, prevent_thread_lock=not block, show_error=True,
        allowed_paths=[str(app.spec.out_dir)], ssr_mode=False, quiet=not block,
    )  # fmt: skip
    return demo


def make_app(cfg: DictConfig) -> InpaintApp:
    """The app of ``cfg``: spec, offered LoRAs (checked before the model loads), the pipeline."""
    import torch

    from dreammix.adm import resolve_device
    from dreammix.inference_setup import load_pipeline, set_scheduler

    spec = AppSpec.from_config(cfg)
    loras = find_loras(spec.lora_roots)
    if not loras:
        log.warning("no LoRA folder under %s: only the base model is offered", [str(r) for r in spec.lora_roots])
    device = torch.device(resolve_device(str(cfg.get("device", "auto"))))
    pipe = load_pipeline(cfg, device)
    set_scheduler(pipe, cfg.get("scheduler", "default"))
    pipe.set_progress_bar_config(disable=True)
    return InpaintApp(spec, pipe, str(cfg.model.pretrained), loras)


def run_app(cfg: DictConfig) -> None:
    """``python src/app.py``: build the app and serve it until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = make_app(cfg)
    log.info("offering %d subject(s); serving on http://%s:%s", len(app.loras), app.spec.host, app.spec.port)
    launch(app, block=True)
