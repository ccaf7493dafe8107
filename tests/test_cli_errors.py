"""The CLI's one error handler: clear errors exit 2, OS errors name the path, anything else is exit 3, no traceback."""

import errno

import pytest
import typer
from typer.testing import CliRunner

from medmerge.cli.common import command
from medmerge.errors import InputError


def _app(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @command(app, "go")
    def go() -> None:
        raise exc

    @command(app, "other")
    def other() -> None:
        pass

    return app


@pytest.mark.parametrize("exc, code, words", [
    (InputError("model x has no config.json"), 2, "error: model x has no config.json"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), 2, "cannot use /ro/out: the file system is read-only"),
    (ValueError("something unchecked"), 3, "internal error: ValueError: something unchecked"),
    (KeyboardInterrupt(), 130, "interrupted:"),
])
def test_every_error_is_an_exit_code_and_a_message(exc, code, words, monkeypatch):
    monkeypatch.delenv("MEDMERGE_DEBUG", raising=False)
    result = CliRunner().invoke(_app(exc), ["go"])
    assert result.exit_code == code
    out = " ".join(result.output.split())
    assert words in out and "Traceback" not in out


def test_medmerge_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("MEDMERGE_DEBUG", "1")
    result = CliRunner().invoke(_app(ValueError("boom")), ["go"])
    assert isinstance(result.exception, ValueError)


@pytest.mark.parametrize("code", [0, 1, 2])
def test_a_commands_own_exit_code_passes_through(code, monkeypatch):
    monkeypatch.delenv("MEDMERGE_DEBUG", raising=False)
    result = CliRunner().invoke(_app(typer.Exit(code)), ["go"])
    assert result.exit_code == code
    assert "internal error" not in result.output
