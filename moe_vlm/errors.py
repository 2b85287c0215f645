"""Expected errors: problems with the user's input that the CLI reports as one line.

Every ``moe-vlm`` command turns a ``UserError`` into ``<command>: <message>`` on stderr
and exit code 2; any other exception is a bug and keeps its traceback. Each message
names what to change (the config key, the file, the flag)."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, files or environment, not a bug."""


class ConfigError(UserError, ValueError):
    """A config value or combination that cannot run; the message names the key."""


class DataError(UserError, ValueError):
    """A data file or directory that cannot be used; the message names the file and why."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, verified or trusted; the message names the file."""


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot be used (locked, not writable, another run's config)."""
