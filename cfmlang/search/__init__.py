"""`search` in the language and `cfmc search`.

A parameter value may be left open, `search(lo, hi[, log])` (a float or integer range) or
`one_of(a, b, ...)` (a choice), and a `search NAME:` statement names the node to build
(`target:`), what to measure on it (`objective:`, weighted `cfmc eval` tasks), how many
trials to run (`budget:`), the `seed:` and the `sampler:` (Optuna's CMA-ES, TPE, random).

The stage sits between resolve and check: `program.open_search` finds the open values
and the statement, `program.concrete` gives the values (the checker then sees an
ordinary program), `program.check_search` checks every value at each end of its range.
A trial (`trial.py`) is the ordinary compile of the program text with the values written
in (`text.py`), scored by `cfmc eval`'s scorer (`objective.py`); `study.py` drives Optuna
with its storage in the output folder, `parallel.py` runs trials as Ray tasks, and
`report.py` writes the report. This module imports nothing, so that the compiler's API
can import the stage without the search machinery."""
