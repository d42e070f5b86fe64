"""Trained subject LoRAs on disk: what each one is (subject, base model, trigger words, attributes).

``train.py`` writes ``<run>/lora/pytorch_lora_weights.safetensors`` with ``lora/dreammix_run.json``
(subject, class noun, source prompt, base model) and Hydra's ``<run>/.hydra/config.yaml`` (the
subject config, whose attribute dictionary TAS reads). The app lists these folders for the user, and
multi-region inpainting takes each region's TAS words from its own subject's dictionary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dreammix.errors import DreamMixError
from dreammix.tas import IDENTIFIER, words_of

log = logging.getLogger(__name__)

RUN_INFO_NAME = "dreammix_run.json"  # = dreammix.train.RUN_INFO_NAME (not imported: that pulls Lightning)


@dataclass(frozen=True)
class LoraEntry:
    """One trained LoRA folder and what its run recorded (None where the run did not say)."""

    path: Path
    subject: str
    class_noun: str | None
    base_model: str | None
    source_prompt: str | None
    attributes: dict[str, list[str]] | None

    @property
    def trigger(self) -> str:
        """The words that call the subject in a prompt: the identifier and the class noun."""
        return f"{IDENTIFIER} {self.class_noun}" if self.class_noun else IDENTIFIER

    @property
    def label(self) -> str:
        return f"{self.subject} ({self.path})"

    def describe(self) -> str:
        """A few Markdown lines for the app."""
        words = ", ".join(w for ws in (self.attributes or {}).values() for w in ws) or "none recorded"
        return (
            f"**subject** {self.subject} · **base model** `{self.base_model or 'unknown'}` · "
            f"**trigger words** `{self.trigger}`  \n**attribute dictionary** {words}"
        )


def read_lora_entry(path: str | Path) -> LoraEntry:
    """The entry of one LoRA folder; :class:`DreamMixError` when it holds no LoRA weights."""
    from dreammix.models.lora import LORA_WEIGHTS_NAME

    path = Path(path).expanduser().resolve()
    if not (path / LORA_WEIGHTS_NAME).is_file():
        raise DreamMixError(f"LoRA folder has no {LORA_WEIGHTS_NAME}", str(path))
    info: dict = {}
    if (path / RUN_INFO_NAME).is_file():
        try:
            info = json.loads((path / RUN_INFO_NAME).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("ignoring unreadable %s: %s", path / RUN_INFO_NAME, exc)
    subject_cfg = _run_subject_config(path.parent / ".hydra" / "config.yaml")
    attributes = None
    if subject_cfg is not None:
        from dreammix.attributes import offline_attributes

        try:
            attributes = offline_attributes(subject_cfg)
        except DreamMixError as exc:
            log.warning("no attribute dictionary for %s: %s", path, exc)
    return LoraEntry(
        path=path,
        subject=str(info.get("subject") or (subject_cfg or {}).get("name") or path.parent.name),
        class_noun=info.get("class_noun") or (subject_cfg or {}).get("class_noun"),
        base_model=info.get("base_model"),
        source_prompt=info.get("source_prompt"),
        attributes=attributes,
    )


def _run_subject_config(config_file: Path) -> dict | None:
    """The ``subject`` section of a train run's saved Hydra config (None when absent/unreadable)."""
    if not config_file.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(config_file)
        subject = cfg.get("subject")
        # the saved config keeps its ${paths.*} interpolations: only the literal keys are read
        return {k: subject[k] for k in ("name", "class_noun", "attributes", "attributes_file") if k in subject} if subject else None
    except Exception as exc:  # noqa: BLE001 - a broken run config only costs the attribute suggestions
        log.warning("ignoring unreadable run config %s: %s", config_file, str(exc).splitlines()[0])
        return None


def find_loras(roots: Iterable[str | Path]) -> list[LoraEntry]:
    """Every ``lora/`` folder with weights under ``roots`` (or a root that is one), sorted by path."""
    from dreammix.models.lora import LORA_WEIGHTS_NAME

    found: dict[Path, LoraEntry] = {}
    for root in roots:
        root = Path(root).expanduser()
        if (root / LORA_WEIGHTS_NAME).is_file():
            candidates = [root / LORA_WEIGHTS_NAME]
        elif root.is_dir():
            candidates = sorted(root.rglob(f"lora/{LORA_WEIGHTS_NAME}"))
        else:
            candidates = []
        for weights in candidates:
            entry = read_lora_entry(weights.parent)
            found.setdefault(entry.path, entry)
    return [found[p] for p in sorted(found)]


def same_base(entry: LoraEntry, pretrained: str) -> bool:
    """Whether the LoRA was trained on ``pretrained`` (paths compared resolved; unknown = yes)."""
    if not entry.base_model:
        return True
    a, b = str(entry.base_model), str(pretrained)
    if Path(a).expanduser().exists() or Path(b).expanduser().exists():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def suggested_eliminate(entry: LoraEntry | None, prompt: str) -> list[str]:
    """TAS words for ``prompt`` from the subject's dictionary (offline same-category rule)."""
    if entry is None or not entry.attributes or IDENTIFIER not in words_of(prompt):
        return []
    from dreammix.attributes import select_attributes_to_eliminate

    return select_attributes_to_eliminate(prompt, entry.attributes)


def parse_words(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated words (the app's text box) → a clean list."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [" ".join(str(w).split()) for w in items if str(w).strip()]
