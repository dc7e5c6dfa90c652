"""The exceptions the library raises for problems a user can fix.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``; anything
else is a bug and gets a traceback. Messages name the file or flag and what is wrong.
"""

from __future__ import annotations

from typing import Any


class Qwen3NextError(Exception):
    """Base of every user-facing error: exit code 1 (a failure, not a usage mistake)."""

    exit_code = 1


class UsageError(Qwen3NextError):
    """The request itself is wrong (a flag value, an empty prompt): exit code 2."""

    exit_code = 2


class RequestError(UsageError):
    """A request field is wrong. `field` is the request's field name; `value` what was given."""

    def __init__(self, field_name: str, value: Any, rule: str):
        self.field, self.value, self.rule = field_name, value, rule
        super().__init__(f"{field_name} {_shown(value)}: {rule}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ConfigError(Qwen3NextError):
    """config.json (or generation_config.json) is missing, unreadable or not Qwen3-Next."""


class CheckpointError(Qwen3NextError):
    """The weight files are missing, truncated, mis-named or mis-shaped."""


class TokenizerError(Qwen3NextError):
    """tokenizer.json / tokenizer_config.json are missing or unusable, or a chat template failed."""


class ContextLengthError(UsageError):
    """The prompt (plus what is asked to be generated) does not fit the model's context."""
