"""Fine-tune a DreamMix LoRA for one subject: ``python src/train.py subject=can [overrides]``."""

from pathlib import Path

from dreammix.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("dreammix.train:train", config_name="train", config_dir=Path(__file__).resolve().parents[1] / "conf")
