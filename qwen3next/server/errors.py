"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Library errors map here once (`from_library`), so a bad field is a 400 naming the API's field and
a failing chat template is a 400 quoting the template's error, never a 500.
"""

from __future__ import annotations

from qwen3next.errors import ContextLengthError, Qwen3NextError, RequestError, TokenizerError

# The Request's field names that the OpenAI API spells differently.
_API_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """An error answer: status, one-line message, and the field it is about (param)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_library(error: Qwen3NextError, prompt_field: str) -> APIError:
    """The answer for a library error raised while checking or rendering a request."""
    if isinstance(error, RequestError):
        name = _API_NAMES.get(error.field, error.field)
        name = prompt_field if name == "prompt" else name
        return APIError(400, str(RequestError(name, error.value, error.rule)), param=name)  # the API's name
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param=prompt_field, code="context_length_exceeded")
    if isinstance(error, TokenizerError):
        return APIError(400, str(error), param=prompt_field, code="chat_template_error")
    if error.exit_code == 2:
        return APIError(400, str(error))
    return APIError(500, str(error))
