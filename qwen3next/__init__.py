"""qwen3next: run Qwen3-Next mixture-of-experts models locally.

    engine = qwen3next.load("path/to/model")
    for event in engine.stream(qwen3next.Request(prompt="Hello", max_new_tokens=32)):
        if isinstance(event, qwen3next.Token):
            print(event.text, end="")
"""

from .engine import Engine, load
from .errors import Qwen3NextError, RequestError
from .request import Request, Result, Token

__version__ = "0.1.0"
__all__ = ["Engine", "Qwen3NextError", "Request", "RequestError", "Result", "Token", "load"]
