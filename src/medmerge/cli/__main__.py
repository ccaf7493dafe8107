"""`python -m medmerge.cli ...` (and `accelerate launch -m medmerge.cli train ...`)."""

from . import app

app()
