"""The VLM client against a real local HTTP server through the real ``openai`` package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, chat_reply, error_reply
from PIL import Image

from dreammix.attributes import attribute_schema
from dreammix.errors import DreamMixError
from dreammix.vlm import VLMClient, VLMError, VLMSettings, make_vlm_client, parse_answer, schema_errors, InvalidAnswer

SECRET = "sk-test-SECRET-0123456789abcdef"
SCHEMA = attribute_schema()
GOOD = {"color": ["Red", "silver"], "material": ["aluminum"], "texture": [], "shape": ["cylindrical"],
        "pattern": [], "breed": [], "accessories": ["pull tab"]}


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "subject.png"
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(path)
    return path


def client_for(server, tmp_path, sleeps=None, **overrides) -> VLMClient:
    settings = dict(model="fake-vlm", base_url=server.url, timeout=2.0, max_retries=2, backoff_base=0.001,
                    backoff_max=0.01, invalid_answer_retries=0, cache_dir=str(tmp_path / "cache"))
    settings.update(overrides)
    record = sleeps.append if sleeps is not None else (lambda s: None)
    return VLMClient(VLMSettings(**settings), sleep=record)


def ask(client, image=None):
    return client.ask_json("system text", "user text", SCHEMA, schema_name="attribute_dictionary",
                           images=[image] if image else [])


def cache_files(tmp_path):
    return list((tmp_path / "cache").rglob("*.json")) if (tmp_path / "cache").exists() else []


def test_good_structured_answer_sends_schema_images_and_key(tmp_path, key, image):
    with FakeOpenAIServer([chat_reply(GOOD)]) as server:
        answer = ask(client_for(server, tmp_path), image)
    assert answer == GOOD
    (request,) = server.requests
    assert request["path"].endswith("/chat/completions")
    assert request["headers"]["authorization"] == f"Bearer {key}"
    body = request["json"]
    assert body["model"] == "fake-vlm"
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert body["response_format"]["json_schema"]["strict"] is True
    parts = body["messages"][1]["content"]
    assert parts[0] == {"type": "text", "text": "user text"}
    assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_malformed_json_is_a_clear_error_and_not_cached(tmp_path, key):
    with FakeOpenAIServer([chat_reply("{not json"), chat_reply("still not json")]) as server:
        client = client_for(server, tmp_path, invalid_answer_retries=1)
        with pytest.raises(VLMError, match="not valid JSON") as info:
            ask(client)
    assert len(server.requests) == 2  # asked once more, then gave up
    assert "fake-vlm" in str(info.value)
    assert cache_files(tmp_path) == []


def test_schema_violation_is_rejected_then_a_valid_retry_is_used(tmp_path, key):
    bad = {**GOOD, "color": "red"}  # a string where a list is required
    with FakeOpenAIServer([chat_reply(bad)]) as server:
        with pytest.raises(VLMError, match=r"does not match the schema: \$\.color: expected array"):
            ask(client_for(server, tmp_path))
    with FakeOpenAIServer([chat_reply({"color": ["red"]}), chat_reply(GOOD)]) as server:
        assert ask(client_for(server, tmp_path, invalid_answer_retries=1)) == GOOD
    assert len(server.requests) == 2


def test_429_then_success_retries_and_honours_retry_after(tmp_path, key):
    sleeps: list[float] = []
    with FakeOpenAIServer([error_reply(429, "slow down", headers={"Retry-After": "0.005"}), chat_reply(GOOD)]) as server:
        assert ask(client_for(server, tmp_path, sleeps)) == GOOD
    assert len(server.requests) == 2
    assert len(sleeps) == 1 and sleeps[0] >= 0.005


def test_timeout_is_retried(tmp_path, key):
    with FakeOpenAIServer([chat_reply(GOOD, delay=1.5), chat_reply(GOOD)]) as server:
        assert ask(client_for(server, tmp_path, timeout=0.3)) == GOOD
    assert len(server.requests) == 2


def test_timeouts_until_budget_spent_name_the_timeout(tmp_path, key):
    with FakeOpenAIServer(default=chat_reply(GOOD, delay=1.0)) as server:
        with pytest.raises(VLMError, match=r"after 2 attempts, last: timed out after 0.2 s"):
            ask(client_for(server, tmp_path, timeout=0.2, max_retries=1))


def test_500s_until_retry_budget_spent_fail_clearly_with_nothing_written(tmp_path, key):
    sleeps: list[float] = []
    with FakeOpenAIServer(default=error_reply(500, "boom")) as server:
        with pytest.raises(VLMError, match=r"after 3 attempts, last: HTTP 500") as info:
            ask(client_for(server, tmp_path, sleeps, max_retries=2))
    assert len(server.requests) == 3
    assert len(sleeps) == 2  # one wait between attempts (their lengths: test_backoff_doubles_...)
    assert isinstance(info.value, DreamMixError)
    assert cache_files(tmp_path) == []


def test_backoff_doubles_from_base_is_jittered_and_capped(tmp_path, key, monkeypatch):
    """Retry k waits backoff_base·2^k, capped at backoff_max, times a jitter factor in [0.5, 1)
    (so clients that failed together spread out); a Retry-After above the cap is capped too.
    The jitter draws are scripted at both ends of their range; the server is an in-process
    stand-in for ``openai.OpenAI`` raising the real ``openai`` status errors (no HTTP: fast)."""
    import types

    import httpx
    import openai

    import dreammix.vlm as vlm

    def status_error(cls, status, headers=None):
        response = httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://127.0.0.1/v1"))
        return cls(f"HTTP {status}", response=response, body=None)

    errors = [status_error(openai.InternalServerError, 500)] * 5
    errors += [status_error(openai.RateLimitError, 429, {"Retry-After": "100"}), status_error(openai.InternalServerError, 500)]
    errors += [status_error(openai.InternalServerError, 503)]
    calls = []

    def create(**payload):
        calls.append(payload)
        raise errors[len(calls) - 1]

    fake = types.SimpleNamespace(chat=types.SimpleNamespace(completions=types.SimpleNamespace(create=create)))
    monkeypatch.setattr(openai, "OpenAI", lambda **kwargs: fake)
    draws = iter([0.0, 0.999999, 0.5, 0.0, 0.999999, 0.0, 0.0])
    monkeypatch.setattr(vlm, "random", types.SimpleNamespace(random=lambda: next(draws)))
    sleeps: list[float] = []
    settings = VLMSettings(model="fake-vlm", max_retries=7, backoff_base=1.0, backoff_max=10.0, cache_dir=None)
    with pytest.raises(VLMError, match=r"after 8 attempts, last: HTTP 503"):
        ask(VLMClient(settings, sleep=sleeps.append))
    assert len(calls) == 8
    # base·2^k = 1, 2, 4, 8, 16→10, (Retry-After 100)→10, 64→10; times the jitter factors
    # 0.5, 1, 0.75, 0.5, 1, -, 0.5 (the cap is jittered too: capped retries still spread out)
    assert sleeps == pytest.approx([0.5, 2.0, 3.0, 4.0, 10.0, 10.0, 5.0], rel=1e-5)


def test_rerun_is_a_cache_hit_with_zero_requests_and_no_key(tmp_path, key, image, monkeypatch):
    with FakeOpenAIServer([chat_reply(GOOD)]) as server:
        first = ask(client_for(server, tmp_path), image)
    assert len(cache_files(tmp_path)) == 1
    monkeypatch.delenv("OPENAI_API_KEY")
    with FakeOpenAIServer() as server:
        client = client_for(server, tmp_path, base_url="https://api.example.com/v1")  # would need a key
        assert ask(client, image) == first
        assert server.requests == [] and client.requests_made == 0
    # Another image is another question: a different cache key.
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(other)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAIServer([chat_reply(GOOD)]) as server:
        ask(client_for(server, tmp_path), other)
        assert len(server.requests) == 1
    assert all(SECRET not in p.read_text() for p in cache_files(tmp_path))


def test_missing_key_is_a_clear_error_but_local_servers_need_none(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = VLMClient(VLMSettings(model="gpt-4o", cache_dir=None))
    with pytest.raises(VLMError, match="no API key: set the OPENAI_API_KEY environment variable"):
        ask(client)
    with FakeOpenAIServer([chat_reply(GOOD)]) as server:
        assert ask(client_for(server, tmp_path)) == GOOD
        assert server.requests[0]["headers"]["authorization"] == "Bearer not-needed"


def test_rejected_request_fails_at_once_without_leaking_the_key(tmp_path, key):
    with FakeOpenAIServer([error_reply(401, f"Incorrect API key provided: {SECRET}")]) as server:
        with pytest.raises(VLMError, match="HTTP 401") as info:
            ask(client_for(server, tmp_path))
    assert len(server.requests) == 1
    assert SECRET not in str(info.value) and "provided: ***" in str(info.value)
    assert SECRET not in repr(client_for(server, tmp_path))


def test_json_object_mode_puts_the_schema_in_the_prompt_and_strips_fences(tmp_path, key):
    fenced = "```json\n" + json.dumps(GOOD) + "\n```"
    with FakeOpenAIServer([chat_reply(fenced)]) as server:
        assert ask(client_for(server, tmp_path, response_format="json_object")) == GOOD
    body = server.requests[0]["json"]
    assert body["response_format"] == {"type": "json_object"}
    assert '"additionalProperties": false' in body["messages"][0]["content"]


def test_truncated_answer_is_invalid(tmp_path, key):
    with FakeOpenAIServer([chat_reply('{"color": ["re', finish_reason="length")]) as server:
        with pytest.raises(VLMError, match="cut off at vlm.max_tokens"):
            ask(client_for(server, tmp_path))


def test_schema_validator_reports_paths():
    assert schema_errors(GOOD, SCHEMA) == []
    errors = schema_errors({"color": ["red", 3], "extra": []}, SCHEMA)
    assert "$.color[1]: expected string, got int" in errors
    assert "$: unexpected key 'extra'" in errors
    assert "$: missing required key 'material'" in errors
    with pytest.raises(InvalidAnswer, match="expected a JSON object"):
        parse_answer("[1, 2]", SCHEMA)


def test_offline_config_builds_no_client_and_bad_settings_name_the_key(compose):
    assert make_vlm_client(compose("adm", ["vlm=offline"]).vlm) is None
    client = make_vlm_client(compose("adm", ["vlm.model=my-model"]).vlm)
    assert client.settings.model == "my-model" and "attributes_user" in client.prompts
    with pytest.raises(DreamMixError, match="vlm.response_format"):
        VLMSettings(response_format="xml")
    with pytest.raises(DreamMixError, match="do not put the API key in the config"):
        make_vlm_client(compose("adm", [f"+vlm.api_key={SECRET}"]).vlm)
