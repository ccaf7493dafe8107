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
from ..io.paths import is_within, resolved
from ..io.writer import check_output


class Result(dict):
    """A recipe's result (what its JSON file holds), with the Markdown summary it wrote as `.markdown`."""

    def __init__(self, data: dict, markdown: str):
        super().__init__(data)
        self.markdown = markdown


def open_run_dir(out: str | Path, force: bool, results: Sequence[str] = ("results.json", "results.md"), *,
                 stale: Sequence[str] = (), what: str = "run", inputs: Sequence[Any] = ()) -> Path:
    """A recipe's run folder, created. A finished run (its first `results` file exists) needs --force.

    Without --force an unfinished run's outputs are reused (an interrupted run continues); with it the
    `stale` sub-folders are removed too. The `results` files are removed either way, so a run that stops
    early leaves none that look current. `inputs` (every path the config names, see `config_inputs`) are
    checked first: OUT must not be or lie inside one, and none may lie in what would be removed.
    """
    out = Path(out).absolute()
    for item in inputs:
        if is_within(out, item):
            raise InputError(f"the run folder {out} {'is' if resolved(out) == resolved(item) else 'is inside'} the "
                             f"input {item}; write the run to a separate folder")
        doomed = [out / name for name in stale] + [out / name for name in results]
        hit = next((d for d in doomed if is_within(item, d)), None)
        if hit is not None:
            raise InputError(f"the input {item} lies in {hit}, which this {what} replaces; move it out of {out} or "
                             "write the run to another folder")
    if force:
        check_output(out, True)
        for name in stale:
            shutil.rmtree(out / name, ignore_errors=True)
    elif results and (out / results[0]).is_file():
        raise InputError(f"{out} holds a finished {what} ({results[0]}); pass --force to run it again")
    out.mkdir(parents=True, exist_ok=True)
    for name in results:
        (out / name).unlink(missing_ok=True)
    return out


def reuse(folder: Path, marker: str, make: Callable[[], Any]) -> bool:
    """Run `make()` unless `folder/marker` shows that this step finished in an earlier run; True when reused."""
    if (folder / marker).is_file():
        return True
    make()
    return False
