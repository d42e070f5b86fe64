"""A thin client for OpenAI-compatible vision-language models (OpenAI, vLLM, Ollama, ...).

ADM asks a VLM for a subject's attribute dictionary (paper §3.3) and TAS asks it which
dictionary words a user prompt overrides (§3.4). Both need the same things, so they live here:

* **Structured answers.** Every request carries a JSON schema (``response_format`` of type
  ``json_schema``, or ``json_object`` / none plus the schema in the prompt for servers without
  structured outputs). The answer is parsed and validated on receipt, so a malformed or
  off-schema reply is caught here, retried a bounded number of times, and never cached.
* **Retries with backoff.** 429, 408/409, 5xx, timeouts and connection errors are retried with
  exponential backoff (honouring ``Retry-After``); the ``openai`` client's own retries are off so
  the budget is ours to count and to test. Other 4xx are the user's to fix and fail at once.
* **A content-addressed disk cache.** The key is a hash of the model, the messages (images
  included, as the exact bytes sent), the schema and the sampling settings; a rerun of the same
  question costs no request, needs no key, and gets the same answer.
* **The key stays secret.** It is read from the environment variable named by
  ``vlm.api_key_env`` when the first uncached request needs it, never stored in the config, the
  cache, logs or error messages (messages are scrubbed of it).

``vlm=offline`` builds no client at all (:func:`make_vlm_client` returns ``None``); callers then
read attribute dictionaries from files (:mod:`dreammix.adm`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import json
import logging
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image

from dreammix.atomic import atomic_write_text
from dreammix.errors import DreamMixError

log = logging.getLogger(__name__)

#: Status codes worth another try: request timeout, conflict, rate limit, and server errors.
RETRY_STATUS = frozenset({408, 409, 429})
#: Stand-in key for local servers (vLLM, Ollama) that ignore the Authorization header.
LOCAL_PLACEHOLDER_KEY = "not-needed"
CACHE_FORMAT = 1


class VLMError(DreamMixError):
    """The VLM could not give a usable answer (network, budget spent, invalid answers, no key)."""


class InvalidAnswer(ValueError):
    """The server answered, but not with JSON that matches the schema (retried, never cached)."""


@dataclass(frozen=True)
class VLMSettings:
    """``conf/vlm/*.yaml`` without the prompt texts (which the callers format)."""

    provider: str = "openai"
    model: str = "gpt-4o"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    #: auto: a key is required unless ``base_url`` is a local server; true/false force it.
    require_key: str | bool = "auto"
    timeout: float = 60.0
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    invalid_answer_retries: int = 1
    response_format: str = "json_schema"
    temperature: float | None = 0.0
    max_tokens: int | None = 1024
    cache_dir: str | None = None
    max_images: int = 4
    image_max_side: int = 512
    image_detail: str = "auto"

    def __post_init__(self) -> None:
        if self.provider not in ("openai", "offline"):
            raise DreamMixError(f"vlm.provider must be openai|offline, got {self.provider!r}", "vlm.provider")
        if self.response_format not in ("json_schema", "json_object", "none"):
            raise DreamMixError(
                f"must be json_schema|json_object|none, got {self.response_format!r}", "vlm.response_format"
            )
        if self.max_retries < 0 or self.invalid_answer_retries < 0:
            raise DreamMixError("retry counts must be >= 0", "vlm.max_retries")
        if self.timeout <= 0:
            raise DreamMixError(f"timeout must be > 0 seconds, got {self.timeout}", "vlm.timeout")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VLMSettings":
        if any(k in cfg for k in ("api_key", "key", "openai_api_key")):
            # A key in the config would be saved by Hydra and logged to W&B with it.
            raise DreamMixError("do not put the API key in the config; export it in the environment variable "
                                "named by vlm.api_key_env", "vlm.api_key")
        names = {f.name for f in fields(cls)}
        return cls(**{k: cfg[k] for k in cfg if k in names})


# ----------------------------------------------------------------------------------------------
# JSON schema: the small subset our schemas use, so no extra dependency is needed.


def schema_errors(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Violations of ``schema`` by ``value`` (empty = valid), each naming the JSON path.

    Supports type, properties, required, additionalProperties, items, minItems, maxItems,
    enum and minLength: what structured-output schemas (strict mode) are made of.
    """
    errors: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        types = expected if isinstance(expected, list) else [expected]
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: expected {'|'.join(types)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not one of {schema['enum']}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        errors.append(f"{path}: shorter than {schema['minLength']} characters")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required key {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                errors += schema_errors(item, props[name], f"{path}.{name}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {name!r}")
            elif isinstance(extra, Mapping):
                errors += schema_errors(item, extra, f"{path}.{name}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}[name])


_FENCE_RE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_answer(content: str | None, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object in a reply, validated against ``schema`` (raises :class:`InvalidAnswer`).

    Markdown code fences are stripped: servers in ``json_object``/``none`` mode often add them.
    """
    if not content or not content.strip():
        raise InvalidAnswer("empty answer")
    fenced = _FENCE_RE.match(content)
    text = fenced.group(1) if fenced else content
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidAnswer(f"not valid JSON ({exc.msg} at char {exc.pos})") from exc
    if not isinstance(data, dict):
        raise InvalidAnswer(f"expected a JSON object, got {type(data).__name__}")
    problems = schema_errors(data, schema)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidAnswer(f"does not match the schema: {problems[0]}{more}")
    return data


# ----------------------------------------------------------------------------------------------
# Cache


class DiskCache:
    """Validated answers on disk, one JSON file per key (``<dir>/<k[:2]>/<k>.json``).

    Writes are atomic (temp file + ``os.replace``), so a killed run leaves either the whole
    entry or none; an unreadable entry counts as a miss.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return entry.get("answer") if isinstance(entry, dict) and entry.get("format") == CACHE_FORMAT else None

    def put(self, key: str, answer: dict[str, Any], model: str) -> None:
        entry = {"format": CACHE_FORMAT, "model": model, "created": time.time(), "answer": answer}
        atomic_write_text(self._path(key), json.dumps(entry, ensure_ascii=False, indent=1))


# ----------------------------------------------------------------------------------------------
# Messages


def encode_image(image: str | Path | Image.Image, max_side: int = 512) -> str:
    """A ``data:image/jpeg;base64,...`` URL of the image, longest side at most ``max_side``.

    Downscaling keeps requests small (VLMs see ~512 px tiles anyway); the bytes are
    deterministic for the same input, which makes them a stable part of the cache key.
    """
    from dreammix.data.images import load_image, to_rgb

    img = load_image(image) if isinstance(image, (str, Path)) else to_rgb(image)
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(
    system: str, user: str, images: Sequence[str | Path | Image.Image] = (), *, max_side: int = 512, detail: str = "auto"
) -> list[dict[str, Any]]:
    """Chat messages: a system prompt, and a user turn with the text and the images."""
    content: list[dict[str, Any]] = [{"type": "text", "text": user}]
    for image in images:
        content.append({"type": "image_url", "image_url": {"url": encode_image(image, max_side), "detail": detail}})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def fill(template: str, **values: Any) -> str:
    """Replace ``{name}`` placeholders of a prompt template (other braces, e.g. JSON, stay)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def _is_local(base_url: str | None) -> bool:
    if not base_url:
        return False
    host = urlparse(base_url).hostname or ""
    if host in ("localhost", "0.0.0.0") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# Client


class VLMClient:
    """Ask an OpenAI-compatible chat endpoint for schema-validated JSON, with retries and a cache.

    ``requests_made`` counts HTTP requests actually sent (cache hits send none).
    """

    def __init__(self, settings: VLMSettings, prompts: Mapping[str, str] | None = None, *, sleep=time.sleep):
        if settings.provider != "openai":
            raise DreamMixError("VLMClient needs vlm.provider=openai (vlm=offline uses no client)", "vlm.provider")
        self.settings = settings
        self.prompts = {str(k): str(v) for k, v in (prompts or {}).items()}
        self.cache = DiskCache(settings.cache_dir) if settings.cache_dir else None
        self.requests_made = 0
        self._sleep = sleep
        self._openai = None
        self._secret: str | None = None

    def __repr__(self) -> str:  # never the key
        return f"VLMClient(model={self.settings.model!r}, base_url={self.settings.base_url!r})"

    @property
    def where(self) -> str:
        return f"vlm {self.settings.model} at {self.settings.base_url or 'api.openai.com'}"

    def prompt(self, name: str, **values: Any) -> str:
        """The prompt template ``vlm.prompts.<name>`` with ``{placeholders}`` filled in."""
        if name not in self.prompts:
            raise DreamMixError(f"prompt {name!r} missing (see conf/vlm/prompts/default.yaml)", f"vlm.prompts.{name}")
        return fill(self.prompts[name], **values)

    # -- key and client -------------------------------------------------------------------------

    def _api_key(self) -> str:
        s = self.settings
        key = os.environ.get(s.api_key_env, "").strip() if s.api_key_env else ""
        if key:
            return key
        mode = str(s.require_key).lower()
        if mode not in ("auto", "true", "false"):
            raise VLMError(f"must be auto|true|false, got {s.require_key!r}", "vlm.require_key")
        required = not _is_local(s.base_url) if mode == "auto" else mode == "true"
        if required:
            raise VLMError(
                f"no API key: set the {s.api_key_env} environment variable (keys are read only from the "
                "environment), or point vlm.base_url at a local OpenAI-compatible server, or use vlm=offline",
                "vlm.api_key_env",
            )
        return LOCAL_PLACEHOLDER_KEY

    def _client(self):
        if self._openai is None:
            import openai

            key = self._api_key()
            self._secret = key if key != LOCAL_PLACEHOLDER_KEY else None
            kwargs: dict[str, Any] = {"api_key": key, "timeout": self.settings.timeout, "max_retries": 0}
            if self.settings.base_url:
                kwargs["base_url"] = self.settings.base_url
            try:
                self._openai = openai.OpenAI(**kwargs)
            except openai.OpenAIError as exc:
                raise VLMError(f"cannot create the OpenAI client: {self._scrub(str(exc))}", self.where) from exc
        return self._openai

    def _scrub(self, text: str) -> str:
        """Remove the key (and any ``sk-...`` token) from text meant for logs or errors."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return re.sub(r"sk-[A-Za-z0-9_\-]{6,}", "sk-***", text)

    # -- requests ---------------------------------------------------------------------------------

    def request_payload(self, messages: list[dict[str, Any]], schema: Mapping[str, Any], schema_name: str) -> dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` (also what the cache key hashes)."""
        s = self.settings
        messages = [dict(m) for m in messages]
        payload: dict[str, Any] = {"model": s.model}
        if s.response_format == "json_schema":
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": dict(schema), "strict": True},
            }
        else:
            if s.response_format == "json_object":
                payload["response_format"] = {"type": "json_object"}
            hint = "\n\nAnswer with one JSON object only, matching this JSON schema:\n" + json.dumps(schema)
            messages[0] = {**messages[0], "content": messages[0]["content"] + hint}
        payload["messages"] = messages
        if s.temperature is not None:
            payload["temperature"] = s.temperature
        if s.max_tokens is not None:
            payload["max_tokens"] = s.max_tokens
        return payload

    @staticmethod
    def cache_key(payload: Mapping[str, Any]) -> str:
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def ask_json(
        self,
        system: str,
        user: str,
        schema: Mapping[str, Any],
        *,
        schema_name: str = "answer",
        images: Sequence[str | Path | Image.Image] = (),
    ) -> dict[str, Any]:
        """The VLM's JSON answer to ``system`` + ``user`` (+ images), validated against ``schema``."""
        s = self.settings
        images = list(images)[: s.max_images] if s.max_images else list(images)
        messages = build_messages(system, user, images, max_side=s.image_max_side, detail=s.image_detail)
        payload = self.request_payload(messages, schema, schema_name)
        key = self.cache_key(payload)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None and not schema_errors(cached, schema):
                log.info("VLM answer for %s from cache (%s)", schema_name, key[:12])
                return cached
        answer = self._request(payload, schema)
        if self.cache is not None:
            self.cache.put(key, answer, s.model)
        return answer

    def _request(self, payload: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
        import openai

        s = self.settings
        client = self._client()
        failures = invalid = 0
        while True:
            self.requests_made += 1
            retry_after: float | None = None
            try:
                log.info("VLM request to %s (attempt %d)", self.where, failures + invalid + 1)
                completion = client.chat.completions.create(**payload)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status not in RETRY_STATUS and status < 500:
                    raise VLMError(f"VLM request rejected: HTTP {status}: {self._scrub(_short(exc))}", self.where) from exc
                problem, retry_after = f"HTTP {status}", _retry_after(exc.response)
            except openai.APITimeoutError:
                problem = f"timed out after {s.timeout:g} s"
            except openai.APIConnectionError as exc:
                problem = f"connection error ({self._scrub(_short(exc))})"
            except openai.OpenAIError as exc:
                raise VLMError(f"VLM request failed: {self._scrub(_short(exc))}", self.where) from exc
            else:
                try:
                    return _answer_of(completion, schema)
                except InvalidAnswer as exc:
                    if invalid >= s.invalid_answer_retries:
                        raise VLMError(f"VLM answer {exc} after {invalid + 1} tries", self.where) from exc
                    invalid += 1
                    log.warning("VLM answer %s; asking again (%d/%d)", exc, invalid, s.invalid_answer_retries)
                    continue
            if failures >= s.max_retries:
                raise VLMError(
                    f"VLM request failed after {failures + 1} attempts, last: {problem} (raise vlm.max_retries or "
                    "vlm.timeout, or try later)",
                    self.where,
                )
            delay = min(s.backoff_max, s.backoff_base * 2**failures) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = min(s.backoff_max, max(delay, retry_after))
            failures += 1
            log.warning("VLM %s; retry %d/%d in %.2f s", problem, failures, s.max_retries, delay)
            self._sleep(delay)


def _short(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else exc.__class__.__name__)[:300]


def _retry_after(response) -> float | None:
    """Seconds from ``Retry-After`` / ``retry-after-ms`` (numbers only; dates are ignored)."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                continue
    return None


def _answer_of(completion, schema: Mapping[str, Any]) -> dict[str, Any]:
    if not getattr(completion, "choices", None):
        raise InvalidAnswer("no choices in the reply")
    choice = completion.choices[0]
    message = choice.message
    if getattr(message, "refusal", None):
        raise InvalidAnswer(f"refused: {str(message.refusal)[:200]}")
    if choice.finish_reason == "length":
        raise InvalidAnswer("cut off at vlm.max_tokens")
    return parse_answer(message.content, schema)


def make_vlm_client(cfg: Mapping[str, Any] | None) -> VLMClient | None:
    """The client for ``cfg.vlm``, or ``None`` for ``vlm=offline`` (or no vlm config)."""
    if cfg is None:
        return None
    settings = VLMSettings.from_config(cfg)
    if settings.provider == "offline":
        return None
    prompts = cfg.get("prompts") or {}
    return VLMClient(settings, {k: prompts[k] for k in prompts})
