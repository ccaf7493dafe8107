"""Errors that reach the user: each says what is wrong, where, and what to do."""

import errno


class MedmergeError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class InputError(MedmergeError):
    """A model folder, checkpoint or tensor is missing, corrupt or inconsistent."""


class ConfigError(MedmergeError):
    """The merge configuration is invalid."""


class OutputExistsError(MedmergeError):
    """The output folder exists and --force was not given."""


class OutputError(MedmergeError):
    """The output could not be written (disk full, read-only file system, no permission)."""


_REMEDIES = {
    errno.ENOSPC: "the disk is full: free some space or choose an output on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose an output on another disk",
    errno.EROFS: "the file system is read-only: choose an output on a writable disk",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.ELOOP: "the path is a symbolic link loop: point the link at a real folder or use another path",
    errno.ENAMETOOLONG: "the name is too long for the file system: use a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: use another path",
    errno.EISDIR: "the path is a folder where a file was expected: use another path",
    errno.EEXIST: "something that is not a folder is in the way (a file, or a symbolic link that leads nowhere "
                  "or to itself): remove it or use another path",
}


def describe_os_error(e: OSError, path: object = None) -> str:
    """An OS error as a message naming the path and what to do (for errors that reach the user)."""
    where = e.filename if e.filename is not None else path
    remedy = _REMEDIES.get(e.errno, f"{e.strerror or e}")
    return f"cannot use {where}: {remedy}" if where is not None else f"{e.strerror or e}: {remedy}"
