"""`cfmc search FILE -o DIR`: the Optuna study of a program's search.

DIR holds the study (`search.db`, Optuna's SQLite storage), each trial's program
(`trials/NNNN.brick`), and at the end the best program (`best.brick`), its artifact
(`model/`) and the report (`report.json`, `report.md`, `trials.png`). Every finished trial
is stored as it ends, so a search stopped at any point (Ctrl-C, SIGTERM, a crash) resumes
with the same command: finished trials are kept and not run again, a trial that was cut
off is run again, and the search stops when `budget` trials have finished. The sampler is
seeded with `seed` plus the number of trials already stored, so a resumed search does not
propose its first values again. A trial whose values equal a finished trial's takes its
result without compiling (`repeat_of`). Trials run here one at a time, or as Ray tasks
(`parallel.py`) several at once."""
from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cfmlang.diagnostics import CompileError, error
from cfmlang.search.program import SearchProgram
from cfmlang.search.driver import Driver
from cfmlang.search.text import program_text

DATABASE = "search.db"
LOCK = ".search.lock"
ALLOWED = {DATABASE, LOCK, "trials", "best.brick", "model", "report.json", "report.md", "trials.png"}
"""What a search folder may hold; a folder holding anything else is not a search's."""
IDENTITY = "cfm_search_identity"


@dataclass(frozen=True)
class SearchSettings:
    cache_dir: Path | None = None
    executor: str = "local"
    address: str | None = None
    progress: Callable[[str], None] = lambda line: None


def open_folder(output: Path, opened: SearchProgram):
    """The locked search folder (E265 when it holds something else, or another search runs in it)."""
    if output.exists() and not output.is_dir():
        raise CompileError([error("E265", f"{output} is a file, not a search folder", None,
                                  "give -o a new folder, or the folder of an earlier run of this search")])
    if output.is_dir():
        foreign = sorted(p.name for p in output.iterdir() if p.name not in ALLOWED and not p.name.startswith("."))
        if foreign or any(output.iterdir()) and not (output / DATABASE).is_file():
            raise CompileError([error("E265", f"{output} is not empty and holds no search "
                                      f"({', '.join(foreign[:3]) or 'no ' + DATABASE})", None,
                                      "give -o a new folder, or the folder of an earlier run of this search")])
    output.mkdir(parents=True, exist_ok=True)
    (output / "trials").mkdir(exist_ok=True)
    handle = open(output / LOCK, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CompileError([error("E265", f"another `cfmc search` is running in {output}", None,
                                  "wait for it to end, or give -o another folder")]) from None
    return handle


def identity(opened: SearchProgram, source: str) -> str:
    """What makes stored trials valid for this program: the program with its search
    values left open, the space, the objective, the sampler and the seed (not the budget,
    so a finished search may be given more trials)."""
    spec = opened.search
    described = {"program": program_text(source, opened, _placeholders(opened)),
                 "space": [(d.name, d.describe()) for d in opened.dimensions],
                 "objective": [spec.objective.direction, [(t.task, t.metric, t.weight) for t in spec.objective.tasks],
                               repr(spec.objective.settings)],
                 "target": spec.target, "sampler": spec.sampler, "seed": spec.seed}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _placeholders(opened: SearchProgram) -> dict:
    return {d.name: (d.texts[0] if d.kind == "choice" else d.low) for d in opened.dimensions}


def create_study(output: Path, opened: SearchProgram, source: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = opened.search
    storage = optuna.storages.RDBStorage(f"sqlite:///{output / DATABASE}")
    study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.objective.direction,
                                load_if_exists=True)
    own = identity(opened, source)
    stored = study.user_attrs.get(IDENTITY)
    if stored is None and not study.trials:
        study.set_user_attr(IDENTITY, own)
    elif stored != own:
        raise CompileError([error("E265", f"{output} holds a search of `{spec.name}` over another program, "
                                  "space or objective", None, "give -o a new folder, or remove this one to start again "
                                  "(its trials do not apply to the program as it is now)")])
    study.sampler = sampler(spec.sampler, spec.seed + len(study.trials))
    return study


def sampler(name: str, seed: int):
    import optuna

    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def interrupted_before(study) -> None:
    """Trials left running by a process that was killed: marked interrupted (they are run
    again as new trials with the same values)."""
    import optuna

    storage = study._storage
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.RUNNING:
            storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params)


def search(path: Path, output: Path, settings: SearchSettings = SearchSettings()):
    """Run (or resume) the search of the program at `path` into the folder `output`;
    returns the report (report.py's SearchReport)."""
    from cfmlang.api import check_search, read_input
    from cfmlang.search.report import finish

    source = read_input(Path(path)).text
    opened = check_search(Path(path))
    if opened.search is None:
        raise CompileError([error("E263", f"{path} has no search statement", None,
                                  "add `search NAME:` with `target:` and `objective:` (docs/language.md, "
                                  "\"Searching parameters\"); `cfmc compile` builds a program as it is")])
    output = Path(output)
    with open_folder(output, opened):
        study = create_study(output, opened, source)
        interrupted_before(study)
        driver = Driver(study, opened, source, Path(path), output, settings)
        if settings.executor == "ray":
            from cfmlang.search.parallel import run_on_ray

            run_on_ray(driver)
        else:
            driver.run_local()
        return finish(driver)
