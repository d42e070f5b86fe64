"""The inpainting app (dreammix.app) through Gradio's Python client against a live server on
127.0.0.1 (tiny model): results at the photo's size with the background kept, no cross-talk
between concurrent clients, bad requests answered with a message while the server keeps serving."""

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from dreammix.crop import feather
from dreammix.errors import DreamMixError
from lora_runs import make_train_run

H, W = 70, 100  # not a multiple of the UNet's size step: the result must still be exactly this size
DOG = (slice(20, 50), slice(10, 45))
CAN = (slice(15, 45), slice(60, 90))
FEATHER = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs") / "train"
    dog = make_train_run(tiny_model_dir, root / "dog" / "r1", "dog", "dog", {"color": ["brown"]}, seed=0)
    can = make_train_run(tiny_model_dir, root / "can" / "r1", "can", "can", {"color": ["blue", "silver"]}, seed=1)
    other = make_train_run(tiny_model_dir, root / "other" / "r1", "cat", "cat", {}, seed=2,
                           base_model="stabilityai/stable-diffusion-xl-base-1.0")  # fmt: skip
    return root, str(dog.resolve()), str(can.resolve()), str(other.resolve())


@pytest.fixture(scope="module")
def server(runs, tiny_model_dir, tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR
    from dreammix.app import launch, make_app

    out = tmp_path_factory.mktemp("app-run")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("app", [f"loras=[{runs[0]}]", "model=tiny", f"run_dir={out}", f"port={_free_port()}",
                              f"dif.feather_radius={FEATHER}", "device=cpu"])  # fmt: skip
    app = make_app(cfg)
    demo = launch(app, block=False)
    try:
        yield app, demo.local_url
    finally:
        demo.close()


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    layers = []
    for i, box in enumerate((DOG, CAN)):
        layer = np.zeros((H, W, 4), np.uint8)
        layer[box] = (255, 0, 255, 255)
        path = tmp_path / f"layer{i}.png"
        Image.fromarray(layer).save(path)
        layers.append(path)
    return paths, layers


def _mask(box):
    m = np.zeros((H, W), np.float32)
    m[box] = 1
    return m


def _args(photo, layers, runs, prompt="a photo of sks dog", words="", second=False, seed=0, subject=None):
    from gradio_client import handle_file

    editor = {"background": handle_file(str(photo)), "layers": [handle_file(str(p)) for p in layers], "composite": None}
    return (handle_file(str(photo)), editor, subject or runs[1], prompt, words, None, second, runs[2],
            "a photo of sks can", "silver", None, 0.5, True, seed, 2, 7.5, 1)  # fmt: skip


def _final(result):
    status, _gallery, _lcg, _boxes, files = result
    assert len(files) == 1
    return status, np.asarray(Image.open(files[0]))


def test_generate_returns_the_photo_size_with_the_background_kept(server, runs, photos):
    from gradio_client import Client

    app, url = server
    (photo, _), (dog_layer, can_layer) = photos
    client = Client(url, verbose=False)
    x = np.asarray(Image.open(photo))
    status, y = _final(client.predict(*_args(photo, [dog_layer], runs), api_name="/generate"))
    assert y.shape == x.shape and "1 region(s): dog" in status
    far = feather(_mask(DOG), FEATHER) == 0
    assert np.array_equal(y[far], x[far]) and not np.array_equal(y[DOG], x[DOG])
    # second region on the second layer, with its own subject
    status, y2 = _final(client.predict(*_args(photo, [dog_layer, can_layer], runs, second=True), api_name="/generate"))
    assert "2 region(s): dog, can" in status
    far = (feather(_mask(DOG), FEATHER) == 0) & (feather(_mask(CAN), FEATHER) == 0)
    assert np.array_equal(y2[far], x[far]) and not np.array_equal(y2[CAN], x[CAN])


def test_two_concurrent_clients_get_their_own_results(server, runs, photos):
    """Two browsers at once (different photo, prompt, seed): the queue runs them one after the
    other, and each result is exactly what its own request gives alone (nothing of one leaks into
    the other)."""
    from gradio_client import Client

    app, url = server
    (p0, p1), (dog_layer, _) = photos
    requests = [_args(p0, [dog_layer], runs, seed=1), _args(p1, [dog_layer], runs, prompt="a sks dog on grass", seed=2)]
    clients = [Client(url, verbose=False) for _ in requests]
    spans, generate = [], app.generate

    def timed(*args, **kwargs):  # the page calls app.generate: record when each request ran
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            spans.append((start, time.perf_counter()))

    app.generate = timed
    try:
        with ThreadPoolExecutor(2) as pool:
            jobs = [c.submit(*r, api_name="/generate") for c, r in zip(clients, requests)]
            results = [_final(j.result(timeout=120))[1] for j in jobs]
    finally:
        del app.generate
    (s0, e0), (s1, e1) = sorted(spans)
    assert e0 <= s1  # the queue ran them one after the other (concurrency 1), never together
    for (photo, prompt, seed), got in zip(((p0, "a photo of sks dog", 1), (p1, "a sks dog on grass", 2)), results):
        from dreammix.app import RegionRequest

        alone = app.generate(str(photo), [RegionRequest(layer=np.asarray(Image.open(dog_layer)), lora=runs[1], prompt=prompt)],
                             lambda_=0.5, tas=True, seed=seed, steps=2, guidance_scale=7.5, num_images=1)  # fmt: skip
        assert np.array_equal(got, np.asarray(Image.open(alone.finals[0])))
    assert not np.array_equal(results[0], results[1])


def test_bad_requests_get_a_message_and_the_server_keeps_serving(server, runs, photos):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    _, url = server
    (photo, _), (dog_layer, _) = photos
    client = Client(url, verbose=False)
    bad = [
        (_args(photo, [], runs), "no mask for region 1"),
        (_args(photo, [dog_layer], runs, prompt="a photo of a dog"), "no 'sks'"),
        (_args(photo, [dog_layer], runs, subject=runs[3]), "trained on stabilityai/stable-diffusion-xl-base-1.0"),
    ]
    for args, message in bad:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/generate")
    _, y = _final(client.predict(*_args(photo, [dog_layer], runs), api_name="/generate"))
    assert y.shape == (H, W, 3)


def test_progress_reports_every_denoising_step_of_every_region(server, runs, photos):
    from dreammix.app import RegionRequest

    app, _ = server
    (photo, _), _ = photos
    seen = []
    regions = [RegionRequest(mask_upload=_mask(DOG) * 255, lora=runs[1], prompt="a sks dog"),
               RegionRequest(mask_upload=_mask(CAN) * 255, lora=runs[2], prompt="a sks can")]  # fmt: skip
    result = app.generate(str(photo), regions, lambda_=0.5, tas=False, seed=0, steps=3, guidance_scale=5.0, num_images=2,
                          progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen == [(i, 6) for i in range(1, 7)]
    assert [Image.open(p).size for p in result.finals] == [(W, H)] * 2
    assert result.boxes.size == (W, H) and len(result.lcg) == 2


def test_subject_info_and_tas_prefill_come_from_the_lora_run(server, runs):
    app, _ = server
    assert [label.split(" (")[0] for label, _ in app.subject_choices()] == ["can", "dog", "cat", "none"]  # by path
    info = app.subject_info(runs[1])
    assert "dog" in info and "`sks dog`" in info and str(app.base_model) in info and "brown" in info
    assert app.default_prompt(runs[2]) == "a photo of sks can"
    assert app.suggest_words(runs[2], "a red sks can") == "blue, silver"
    assert app.suggest_words(runs[2], "a photo of sks can") == ""
    with pytest.raises(DreamMixError, match="overlap"):
        from dreammix.app import RegionRequest

        m = _mask(DOG) * 255
        app.generate(np.zeros((H, W, 3), np.uint8), [RegionRequest(mask_upload=m, prompt="a"), RegionRequest(mask_upload=m, prompt="b")],
                     lambda_=0.5, tas=False, seed=0, steps=1, guidance_scale=5.0, num_images=1)  # fmt: skip


def test_app_config_is_checked_before_any_model_loads(compose, tmp_path):
    from dreammix.app import AppSpec

    cfg = compose("app", [f"run_dir={tmp_path}"])
    spec = AppSpec.from_config(cfg)
    assert spec.host == "127.0.0.1" and spec.port == 7860 and spec.lora_roots == (tmp_path.__class__("outputs/train"),)
    with pytest.raises(DreamMixError, match="allow_remote=true"):
        AppSpec.from_config(compose("app", [f"run_dir={tmp_path}", "host=0.0.0.0"]))
    assert AppSpec.from_config(compose("app", [f"run_dir={tmp_path}", "host=0.0.0.0", "allow_remote=true"])).host == "0.0.0.0"
    with pytest.raises(DreamMixError, match="expected int"):
        AppSpec.from_config(compose("app", [f"run_dir={tmp_path}", "port=http"]))
