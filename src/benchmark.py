"""The whole reproduction: ``python src/benchmark.py [bench=full|tiny] [bench.subjects=[can,dog]] ...``
(``make benchmark [BENCH=tiny]``): benchmark → LoRAs → evaluation → table1.md / table3.md."""

from pathlib import Path

from dreammix.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("dreammix.benchmark.run:main", config_name="benchmark_run", config_dir=Path(__file__).resolve().parents[1] / "conf")
