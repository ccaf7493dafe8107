"""Path safety: names from configs that become folder names, outputs that must not touch inputs.

Two rules every writer follows (docs/reliability.md):
- a name read from a config (a start, a reference, a role, a task, a study) becomes at most one
  path component under OUT: `safe_name` refuses separators, `..`, hidden and absolute names, and
  `under` checks the resolved result really lies under OUT (symlinks included);
- an output never is, contains, or lies inside one of the command's inputs (`check_not_input`),
  so `--force` can never delete a model, an adapter, a data file or a run folder it reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional, Union

from ..errors import InputError

PathLike = Union[str, Path]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+,@-]{0,127}")


def safe_name(name: object, what: str) -> str:
    """`name` when it is safe as one folder or file name; otherwise an error naming `what`.

    Allowed: letters, digits and `_ . = + , @ -`, at most 128 characters, not starting with `.` or
    `-`, not `.`/`..`. So `../x`, `/tmp/x`, `a/b`, `.hidden` and `-rf` are all refused.
    """
    text = str(name)
    if not isinstance(name, (str, int, float)) or not _NAME.fullmatch(text) or text in (".", ".."):
        raise InputError(
            f"{what} {text!r} cannot be used as a folder name: use letters, digits and _ . = + , @ - "
            "(at most 128 characters, not starting with . or -, no / or ..)")
    return text


def resolved(path: PathLike) -> Path:
    """The absolute path with symlinks followed (for a path that does not exist yet, as far as it does)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def is_within(path: PathLike, folder: PathLike) -> bool:
    """True when `path` is `folder` or lies inside it (both resolved)."""
    p, f = resolved(path), resolved(folder)
    return p == f or f in p.parents


def under(root: PathLike, *parts: str, what: str = "path") -> Path:
    """`root / parts...`, refused unless it resolves to a path strictly inside `root`."""
    root = Path(root)
    path = root.joinpath(*[str(p) for p in parts])
    r, p = resolved(root), resolved(path)
    if p == r or r not in p.parents:
        raise InputError(f"{what} {'/'.join(map(str, parts))!r} would be written outside {root}; "
                         "use a plain name without / or ..")
    return path


def check_not_input(out: PathLike, inputs: Iterable[Optional[PathLike]], what: str = "output") -> None:
    """Refuse when `out` is, contains, or lies inside any of `inputs` (files or folders; None skipped).

    Checked before any work starts, with or without --force: replacing OUT would delete an input it
    contains, and writing into an input folder would change what later commands read as that input.
    """
    o = resolved(out)
    for item in inputs:
        if item is None or str(item) == "":
            continue
        i = resolved(item)
        if o == i:
            relation = "is"
        elif o in i.parents:
            relation = "contains"
        elif i in o.parents:
            relation = "is inside"
        else:
            continue
        raise InputError(f"{what} {out} {relation} the input {item}; an output must be a separate folder "
                         "(neither the input, nor a folder holding it, nor a folder inside it): choose another "
                         "output path")
