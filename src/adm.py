"""Attribute Decoupling Mechanism for one subject: ``python src/adm.py subject=can [overrides]``.

VLM attribute dictionary → regular prompts → regular images + masks in ``adm.out_dir``
(see :mod:`dreammix.adm`).
"""

from pathlib import Path

from dreammix.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("dreammix.adm:run_adm", config_name="adm", config_dir=Path(__file__).resolve().parents[1] / "conf")
