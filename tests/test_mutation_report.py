"""`make mutants`' report (scripts/mutation_report.py): mutmut's mutant names grouped by module,
killed = a failing test or a timeout, scores against the issue-11 targets, survivors listed."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mutation_report.py"


@pytest.fixture(scope="module")
def mr():
    spec = importlib.util.spec_from_file_location("mutation_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name,module",
    [
        ("dreammix.losses.x_latent_mask__mutmut_3", "dreammix.losses"),
        ("dreammix.metrics.fid.x_fid_from_stats__mutmut_12", "dreammix.metrics.fid"),
        ("dreammix.pipeline.xǁDreamMixInpaintPipelineǁ_sharpen__mutmut_7", "dreammix.pipeline"),
        ("dreammix.pipeline_inputs.x__as_rgb_array__mutmut_1", "dreammix.pipeline_inputs"),
    ],
)
def test_mutant_names_map_to_their_module(mr, name, module):
    assert mr.module_of(name) == module


def test_targets_follow_issue_11(mr):
    assert mr.target_of("dreammix.losses") == 0.90 and mr.target_of("dreammix.crop") == 0.90
    assert mr.target_of("dreammix.metrics.fid") == 0.80 and mr.target_of("dreammix.pipeline_inputs") == 0.80
    assert mr.target_of("dreammix.models.lora") is None
    assert mr.target_of("dreammix.lossesx") is None  # a prefix match is a module match, not a string match


def test_scores_count_timeouts_as_killed_and_flag_unmet_or_incomplete_runs(mr):
    rows = [(f"dreammix.losses.x_f__mutmut_{i}", "killed") for i in range(8)]
    rows += [("dreammix.losses.x_f__mutmut_8", "timeout"), ("dreammix.losses.x_f__mutmut_9", "survived")]
    text, met = mr.report(rows)
    assert "| dreammix.losses | 10 | 9 | 1 | 0 | 90.0% | 90% met |" in text
    assert "dreammix.losses.x_f__mutmut_9 (survived)" in text and met
    text, met = mr.report(rows + [("dreammix.losses.x_f__mutmut_10", "survived")])
    assert "81.8%" in text and "NOT met" in text and not met
    text, met = mr.report(rows + [("dreammix.losses.x_f__mutmut_10", "not checked")])
    assert "| 1 | 90.0% | 90% met (run incomplete) |" in text and not met
