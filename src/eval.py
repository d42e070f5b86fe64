"""The COCO benchmark for one subject: ``python src/eval.py subject=can lora_dir=<train run>/lora [experiment=dif]``.

Ablation rows: ``experiment=baseline|dif|dif_tas|dif_tas_adm`` (default, = DreamMix). Sweeps:
``python src/eval.py -m subject=can lora_dir=... dif.lambda_=0,0.3,0.5,0.7,1`` (one W&B run per job,
``<sweep dir>/results.md`` at the end).
"""

from pathlib import Path

from dreammix.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("dreammix.evaluate:evaluate", config_name="eval", config_dir=Path(__file__).resolve().parents[1] / "conf")
