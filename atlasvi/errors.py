"""The one base of expected failures. The CLI prints such an error as one line (no traceback) and exits
with its `exit_code`; `atlasvi --debug COMMAND` shows the traceback. Every layer may raise it."""


class AtlasviError(Exception):
    """A failure a person can act on; the message names the file, key, field, chunk or cell at fault."""

    exit_code = 1


class ConfigError(AtlasviError, ValueError):
    """A config file or flag is invalid (unknown field, bad value, malformed YAML)."""

    exit_code = 2
