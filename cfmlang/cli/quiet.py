"""The one place that keeps third-party noise out of `cfmc`'s output: Python warnings
(FutureWarning, PEFT's "Could not find a config file" ...), the log records of
transformers, PEFT, accelerate and huggingface_hub below errors, and their download and
loading bars. `--verbose` shows them all. cfmlang's own warnings are diagnostics
(W codes), printed by the commands, never Python warnings."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

THIRD_PARTY_LOGGERS = ("transformers", "peft", "accelerate", "huggingface_hub", "datasets", "torch")
QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                     "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
"""Read by huggingface_hub and transformers when first imported (their bars and advice)."""


@contextlib.contextmanager
def third_party_output(verbose: bool):
    """Within: third-party warnings, log records below errors and bars are not shown,
    unless `verbose`."""
    if verbose:
        yield
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
