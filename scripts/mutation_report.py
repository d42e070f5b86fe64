"""Per-module mutation scores of the last ``mutmut run`` (``make mutants``) against the targets.

mutmut names each mutant ``<module>.x_<function>__mutmut_<n>`` (methods: ``<module>.xǁ<Class>ǁ…``);
this groups ``mutmut results --all true`` by module, counts killed (a test failed, or the mutant
hung past mutmut's timeout) against all tested mutants, compares with the issue-11 targets, and
lists the survivors so each one can be judged: a missing test, or an equivalent mutant.
Writes the table to stdout and to ``--out`` (markdown).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

#: Kill-rate targets (issue 11): the loss, TAS and crop maths 90 %, the rest of the core 80 %.
TARGETS = {
    "dreammix.losses": 0.90,
    "dreammix.tas": 0.90,
    "dreammix.crop": 0.90,
    "dreammix.module": 0.80,
    "dreammix.data.frozen": 0.80,
    "dreammix.pipeline": 0.80,
    "dreammix.pipeline_inputs": 0.80,  # split out of pipeline.py (image and mask normalisation, λ·T)
    "dreammix.metrics": 0.80,
}
KILLED = ("killed", "timeout")
NOT_RUN = ("not checked", "skipped")


def module_of(mutant: str) -> str:
    """``dreammix.losses.x_latent_mask__mutmut_3`` → ``dreammix.losses`` (also for ``xǁClassǁ`` names)."""
    head = mutant.split("__mutmut_")[0]
    parts = head.split(".")
    while parts and not (parts[-1].startswith("x_") or parts[-1].startswith("xǁ")):
        parts.pop()
    return ".".join(parts[:-1]) if parts else head


def target_of(module: str) -> float | None:
    for prefix, target in TARGETS.items():
        if module == prefix or module.startswith(prefix + "."):
            return target
    return None


def read_results(mutmut: str) -> list[tuple[str, str]]:
    out = subprocess.run([mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            rows.append((name, status))
    return rows


def report(rows: list[tuple[str, str]]) -> tuple[str, bool]:
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in rows:
        module = module_of(name)
        by_module[module][status] += 1
        if status not in KILLED and status not in NOT_RUN:
            survivors[module].append(f"{name} ({status})")
    lines = ["| module | tested | killed | survived / no tests | not yet run | score | target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    all_met = True
    for module in sorted(by_module):
        counts = by_module[module]
        tested = sum(n for s, n in counts.items() if s not in NOT_RUN)
        killed = sum(counts[s] for s in KILLED)
        score = killed / tested if tested else 0.0
        target = target_of(module)
        met = target is None or score >= target
        all_met &= met
        verdict = "—" if target is None else f"{target:.0%} {'met' if met else 'NOT met'}"
        pending = sum(n for s, n in counts.items() if s in NOT_RUN)
        if pending:
            all_met = False
            verdict += " (run incomplete)"
        lines.append(f"| {module} | {tested} | {killed} | {tested - killed} | {pending} | {score:.1%} | {verdict} |")
    lines.append("")
    for module in sorted(survivors):
        lines.append(f"Survivors in {module} (`mutmut show <name>` for the diff):")
        lines += [f"- {s}" for s in survivors[module]]
        lines.append("")
    return "\n".join(lines), all_met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/mutants/report.md"))
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")))
    args = parser.parse_args(argv)
    rows = read_results(args.mutmut)
    if not rows:
        print("error: no mutmut results here; run `make mutants` first", file=sys.stderr)
        return 2
    text, all_met = report(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    print(f"(written to {args.out})")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
