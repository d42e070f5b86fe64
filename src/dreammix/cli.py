"""Entry-point plumbing shared by ``src/*.py``: Hydra main + one-line errors.

Bad input (a :class:`DreamMixError`, an unknown config option, a missing mandatory value) ends
the program with one line ``error: <what> (<which file/key>)`` on stderr and exit code 2.
``debug=true`` on the command line or ``HYDRA_FULL_ERROR=1`` shows the full traceback instead.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dreammix import sweeps as _sweeps  # noqa: F401 - registers ${dreammix_swept:...} of conf/hydra (also on workers)

EXIT_BAD_INPUT = 2

_DEBUG_FLAGS = {"debug=true", "debug=True", "+debug=true", "debug=1"}


def _debug_requested(argv: list[str]) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or any(arg in _DEBUG_FLAGS for arg in argv)


def one_line(exc: BaseException) -> str:
    """The first meaningful line of an exception message (Hydra's span several lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else exc.__class__.__name__
    # Hydra adds the option list on later lines; keep the sentence that says what is wrong.
    return text


def bad_input_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dreammix.errors import DreamMixError

    return (DreamMixError, HydraException, OmegaConfBaseException)


def _resolve_task(task: Callable[[Any], Any] | str) -> Callable[[Any], Any]:
    if callable(task):
        return task
    module, _, name = task.partition(":")
    return getattr(importlib.import_module(module), name)


def hydra_entry(task: Callable[[Any], Any] | str, config_name: str, config_dir: str | Path) -> None:
    """Run ``task(cfg)`` under ``@hydra.main`` with the project's error contract.

    Hydra normally prints config errors itself and exits 1; with ``HYDRA_FULL_ERROR=1`` set
    internally it raises them instead, so we can report every bad input the same way.
    ``task`` may be ``"module:function"``: it is imported only once the config composed, so a
    typo on the command line is reported before torch and diffusers are even imported.
    """
    import hydra

    argv = sys.argv[1:]
    debug = _debug_requested(argv)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # W&B stays on this machine unless the user asks for a sync mode explicitly.
    os.environ.setdefault("WANDB_MODE", "offline")

    def fail(exc: BaseException) -> None:
        if debug:
            raise exc
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", EXIT_BAD_INPUT))  # e.g. 143 for a training stopped by SIGTERM

    @hydra.main(version_base="1.3", config_path=str(Path(config_dir).resolve()), config_name=config_name)
    def _main(cfg):  # noqa: ANN001 - Hydra passes a DictConfig
        # Caught inside the job, so Hydra adds no "Error executing job" line of its own.
        try:
            from dreammix.validation import validate_config

            validate_config(cfg)
            return _resolve_task(task)(cfg)
        except bad_input_types() as exc:
            fail(exc)

    try:
        # Secrets and path-escaping names are refused before Hydra creates the run folder and
        # writes the overrides into .hydra/.
        from dreammix.validation import check_argv

        check_argv(argv)
        _main()
    except bad_input_types() as exc:  # composition errors: unknown option, bad override syntax
        fail(exc)


def config_value(cfg, key: str, kind: type):
    """``kind(cfg[key])`` with a one-line error naming the key when the value does not convert."""
    from dreammix.errors import DreamMixError

    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise DreamMixError(f"expected {kind.__name__}, got {value!r}", key) from exc
