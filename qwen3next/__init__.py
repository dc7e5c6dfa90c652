"""qwen3next: run Qwen3-Next mixture-of-experts models locally.

    engine = qwen3next.load("path/to/model")
    for token in engine.generate("Hello", max_new_tokens=32):
        print(token.text, end="")
"""

from .engine import Engine, Token, load
from .errors import Qwen3NextError

__version__ = "0.1.0"
__all__ = ["Engine", "Qwen3NextError", "Token", "load"]
