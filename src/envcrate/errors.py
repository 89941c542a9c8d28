"""Errors a user can act on.

Every expected failure is an :class:`EnvcrateError` whose message is one line
saying what failed and what to do; the command line prints it without a
traceback.
"""


class EnvcrateError(Exception):
    """An expected failure with a message meant for the user."""


class SourceEnvError(EnvcrateError):
    """The source environment cannot be packed as it is."""


class ArchiveError(EnvcrateError):
    """An archive is corrupt, truncated or not a crate."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would escape the destination or carries unsafe bits."""


class DigestMismatchError(ArchiveError):
    """Bytes or entries do not match the digest they were recorded with."""


class IncompatibleError(EnvcrateError):
    """The crate cannot run on this host (OS, machine, Python or libc)."""


class RelocationError(EnvcrateError):
    """The crate cannot be relocated to the requested prefix."""


class StoreError(EnvcrateError):
    """A store cannot be reached, read or written."""


class NotFoundError(EnvcrateError):
    """A crate, tag or archive does not exist where it was looked for."""
