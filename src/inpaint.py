"""DIF + TAS inference on one image: ``python src/inpaint.py image=… mask=… prompt="a sks red can" lora=…``."""

from pathlib import Path

from dreammix.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("dreammix.inpaint:run_inpaint", config_name="inpaint", config_dir=Path(__file__).resolve().parents[1] / "conf")
