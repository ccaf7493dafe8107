"""Run folders of the experiment recipes: open one (or continue an interrupted one), reuse its finished steps.

Every recipe (sweep, few-shot, two-stage LoRA, MedCare vs LoRA, the demo) writes all of
its steps under one OUT folder. A finished run is not overwritten without --force; an
interrupted one continues, each step that left its marker file (a training record, a
merge record, a results.json) being reused instead of run again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import InputError
from ..io.paths import is_within, resolved, under
from ..io.writer import check_output


class Result(dict):
    """A recipe's result (what its JSON file holds), with the Markdown summary it wrote as `.markdown`."""

    def __init__(self, data: dict, markdown: str):
        super().__init__(data)
        self.markdown = markdown


def check_run_dir(out: str | Path, force: bool, results: Sequence[str] = ("results.json", "results.md"), *,
                  stale: Sequence[str] = (), written: Sequence[str] = (), what: str = "run",
                  inputs: Sequence[Any] = ()) -> Path:
    """Every check of a recipe's run folder, touching nothing: returns OUT (absolute).

    `inputs` (every path the config names, see `config_inputs`, the config file first): OUT must not be or
    lie inside one, and none may lie in what the run removes (`stale` with --force, the `results`) or
    overwrites (`written`, e.g. its resolved-config record). A finished run (its first `results` file
    exists) needs --force.
    """
    out = Path(out).absolute()
    doomed = [out / name for name in stale] + [out / name for name in results] + [out / name for name in written]
    for item in inputs:
        if is_within(out, item):
            raise InputError(f"the run folder {out} {'is' if resolved(out) == resolved(item) else 'is inside'} the "
                             f"input {item}; write the run to a separate folder")
        hit = next((d for d in doomed if is_within(item, d)), None)
        if hit is not None:
            raise InputError(f"the input {item} lies in {hit}, which this {what} replaces; move it out of {out} or "
                             "write the run to another folder")
    if force:
        check_output(out, True, in_place=True)  # a run folder is written where it is (a link to one is fine)
    elif results and (out / results[0]).is_file():
        raise InputError(f"{out} holds a finished {what} ({results[0]}); pass --force to run it again")
    return out


def clear_run_dir(out: Path, force: bool, results: Sequence[str] = ("results.json", "results.md"), *,
                  stale: Sequence[str] = ()) -> Path:
    """Create OUT; remove the `stale` sub-folders (with --force) and the `results` files, so that a run that stops
    early leaves none that look current. Call it after the config and the inputs were validated, right before
    the first step: a run that is refused deletes nothing."""
    if force:
        for name in stale:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in results:
        (out / name).unlink(missing_ok=True)
    return out


def open_run_dir(out: str | Path, force: bool, results: Sequence[str] = ("results.json", "results.md"), *,
                 stale: Sequence[str] = (), written: Sequence[str] = (), what: str = "run",
                 inputs: Sequence[Any] = ()) -> Path:
    """A recipe's run folder, created: `check_run_dir` then `clear_run_dir` at once.

    Without --force an unfinished run's outputs are reused (an interrupted run continues); with it the
    `stale` sub-folders are removed too. The `results` files are removed either way. Recipes whose config
    is read after the folder is opened (a `world:` built into OUT) call the two steps apart instead, so that
    nothing is removed before the config was validated.
    """
    out = check_run_dir(out, force, results, stale=stale, written=written, what=what, inputs=inputs)
    return clear_run_dir(out, force, results, stale=stale)


def resolved_name(name: str) -> str:
    """The file a recipe records the config it ran with in: `NAME.resolved.yml`, never the user's own config
    (which may be kept in OUT as NAME.yml; `check_run_dir`'s `written` refuses a config of this very name)."""
    return f"{name}.resolved.yml"


def resolved_config(out: Path, name: str) -> Path:
    """OUT/NAME.resolved.yml, refused if a link takes it outside OUT."""
    return under(out, resolved_name(name), what=f"{name} config record")


def reuse(folder: Path, marker: str, make: Callable[[], Any]) -> bool:
    """Run `make()` unless `folder/marker` shows that this step finished in an earlier run; True when reused."""
    if (folder / marker).is_file():
        return True
    make()
    return False
