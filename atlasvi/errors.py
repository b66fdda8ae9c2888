"""The one base of expected failures. The CLI prints such an error as one line (no traceback) and exits
with its `exit_code`; `atlasvi --debug COMMAND` shows the traceback. Every layer may raise it."""


class AtlasviError(Exception):
    """A failure a person can act on; the message names the file, key, field, chunk or cell at fault."""

    exit_code = 1


class ConfigError(AtlasviError, ValueError):
    """A config file or flag is invalid (unknown field, bad value, malformed YAML)."""

    exit_code = 2


def caused_by_interrupt(err: BaseException) -> bool:
    """Whether Ctrl-C is behind `err` (a library that wraps the KeyboardInterrupt, e.g. an import cut short
    reads as ImportError('initialization failed')): the command was interrupted, nothing is at fault."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False
