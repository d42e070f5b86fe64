"""The inpainting web app: ``python src/app.py [model=… loras=[…] port=…]`` (conf/app.yaml)."""

from pathlib import Path

from dreammix.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("dreammix.app:run_app", config_name="app", config_dir=Path(__file__).resolve().parents[1] / "conf")
