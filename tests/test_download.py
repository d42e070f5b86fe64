"""The downloader behind `make data` and first-use subject data, against a loopback HTTP server:
a checksum mismatch, a connection cut mid-file, a resumed download (Range), the DreamBooth subject
fetched on first use, and the one-line error of a fresh clone without network."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import zipfile

import pytest

import dreammix.data.download as dl
from conftest import REPO_ROOT
from dreammix.data.subjects import Subject, ensure_subject_images
from dreammix.errors import DreamMixError


class _Server(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` with Range support; the first ``cut_first`` responses promise the whole
    rest (Content-Length) but close after ``cut_at`` bytes, like a dropped connection."""

    payload = b""
    requests: list = []
    cut_first = 0
    cut_at = 0

    def do_GET(self):  # noqa: N802 - http.server API
        header = self.headers.get("Range")
        cls = type(self)
        cls.requests.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header else 0
        body = cls.payload[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if len(cls.requests) <= cls.cut_first:
            self.wfile.write(body[: cls.cut_at])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Server.payload, _Server.requests, _Server.cut_first, _Server.cut_at = b"", [], 0, 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/dreambooth.zip"


def _file_item(url: str, payload: bytes, **checks) -> dl.Item:
    return dl.Item(name="weights", url=url, filename="w.bin", install=dl.install_file("weights/w.bin"), **checks)


def test_checksum_mismatch_is_refused_and_nothing_installed(server, tmp_path):
    payload = os.urandom(5000)
    _Server.payload = payload
    data = tmp_path / "data"
    item = _file_item(f"{server}/w.bin", payload, md5=hashlib.md5(payload + b"x").hexdigest(), size=len(payload))
    with pytest.raises(dl.DownloadError, match="md5"):
        dl.fetch(item, data, retries=1)
    assert not (data / "weights" / "w.bin").exists()
    assert not (data / ".installed" / "weights.json").exists()
    assert not (data / "downloads" / "w.bin").exists()  # dropped: the next run starts over
    # a sha256-prefix mismatch likewise (the torch-hub convention of the Inception weights)
    bad_prefix = "0" * 8 if not hashlib.sha256(payload).hexdigest().startswith("0" * 8) else "f" * 8
    with pytest.raises(dl.DownloadError, match="sha256"):
        dl.fetch(_file_item(f"{server}/w.bin", payload, sha256_prefix=bad_prefix), data, retries=1)


def test_truncated_download_keeps_the_part_and_the_rerun_resumes_with_range(server, tmp_path):
    payload = os.urandom(300_000)
    _Server.payload, _Server.cut_first, _Server.cut_at = payload, 1, 120_000
    data = tmp_path / "data"
    item = _file_item(f"{server}/w.bin", payload, md5=hashlib.md5(payload).hexdigest(), size=len(payload))
    with pytest.raises(dl.DownloadError, match="failed after 1 attempt"):
        dl.fetch(item, data, retries=1)  # the connection dropped: no partial file at the target
    part = data / "downloads" / "w.bin.part"
    assert part.read_bytes() == payload[:120_000]
    assert not (data / "downloads" / "w.bin").exists() and not (data / "weights").exists()

    assert dl.fetch(item, data, retries=1)  # a rerun asks only for the rest
    assert _Server.requests == [None, "bytes=120000-"]
    assert (data / "weights" / "w.bin").read_bytes() == payload
    assert not part.exists()
    assert dl.fetch(item, data, retries=1) is False and len(_Server.requests) == 2  # installed: skipped


def test_cut_connection_is_retried_within_one_run_from_where_it_stopped(server, tmp_path):
    payload = os.urandom(200_000)
    _Server.payload, _Server.cut_first, _Server.cut_at = payload, 2, 50_000
    target = tmp_path / "w.bin"
    dl.download(f"{server}/w.bin", target, retries=3, backoff=0.01)
    assert _Server.requests == [None, "bytes=50000-", "bytes=100000-"]
    assert target.read_bytes() == payload


def _dreambooth_zip(subjects: dict[str, int], prompts: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("dreambooth-abc/dataset/prompts_and_classes.txt", prompts)
        for name, count in subjects.items():
            for i in range(count):
                zf.writestr(f"dreambooth-abc/dataset/{name}/{i:02d}.jpg", f"{name}{i}".encode())
    return buffer.getvalue()


def test_dreambooth_subject_comes_on_first_use_then_stays(server, tmp_path, monkeypatch):
    prompts = "Classes\nsubject_name,class\ncan,can\ndog,dog\n"
    _Server.payload = _dreambooth_zip({"can": 2, "dog": 1}, prompts)
    monkeypatch.setattr(dl, "DREAMBOOTH_SUBJECTS", 2)
    monkeypatch.setattr(dl, "DREAMBOOTH_IMAGES", 3)
    monkeypatch.setattr(dl, "DREAMBOOTH_PROMPTS_SHA256", hashlib.sha256(prompts.encode()).hexdigest())
    monkeypatch.setenv("DREAMMIX_DREAMBOOTH_URL", f"{server}/db.zip")
    root = tmp_path / "somewhere" / "dreambooth"
    subject = Subject(name="can", class_noun="can", image_dir=root / "images" / "can", mask_dir=root / "masks" / "can")
    ensure_subject_images(subject, root)
    assert sorted(p.name for p in (root / "images" / "can").iterdir()) == ["00.jpg", "01.jpg"]
    assert (root / "images" / "can" / "01.jpg").read_bytes() == b"can1"
    assert (root / "prompts_and_classes.txt").read_text() == prompts
    ensure_subject_images(subject, root)  # present: no second request
    assert len(_Server.requests) == 1
    # A custom subject elsewhere is never downloaded.
    custom = Subject(name="mug", class_noun="mug", image_dir=tmp_path / "mine")
    ensure_subject_images(custom, root)
    assert len(_Server.requests) == 1


def test_dreambooth_archive_with_wrong_content_is_refused(server, tmp_path, monkeypatch):
    prompts = "Classes\ncan,can\n"
    _Server.payload = _dreambooth_zip({"can": 2}, prompts)
    monkeypatch.setattr(dl, "DREAMBOOTH_PROMPTS_SHA256", "0" * 64)  # the pinned checksum does not match
    monkeypatch.setenv("DREAMMIX_DREAMBOOTH_URL", f"{server}/db.zip")
    root = tmp_path / "dreambooth"
    subject = Subject(name="can", class_noun="can", image_dir=root / "images" / "can")
    with pytest.raises(DreamMixError, match=r"prompts_and_classes.txt sha256 .*make data.*paths\.dreambooth_dir"):
        ensure_subject_images(subject, root)
    assert not (root / "images").exists()


def test_fresh_clone_offline_quick_start_is_one_line_naming_make_data(tmp_path):
    """The README's tiny quick-start from a folder without data/ and without network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DREAMMIX_DREAMBOOTH_URL": _closed_port_url()}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(REPO_ROOT / "src" / "train.py"), "subject=can", "model=tiny", "trainer.max_steps=5"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "make data" in errors[0] and "paths.dreambooth_dir" in errors[0], result.stderr
    assert "data/dreambooth/images/can" in errors[0]
    assert not (tmp_path / "data").exists()  # nothing written for a download that never started


def test_make_data_runs_on_the_standard_library_alone():
    """`make data` runs before `make install`: the script and the module it runs import nothing
    outside the standard library."""
    # no PYTHONPATH, no site-packages (-S): the script finds the package by itself
    code = (f"import runpy, sys; runpy.run_path({str(REPO_ROOT / 'scripts' / 'download_data.py')!r}, run_name='x'); "
            "import dreammix.data.download; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'dreammix', '__main__'}))")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
