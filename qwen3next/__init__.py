"""qwen3next: run Qwen3-Next mixture-of-experts models locally.

    engine = qwen3next.load("path/to/model")
    for event in engine.stream(qwen3next.Request(prompt="Hello", max_new_tokens=32)):
        if isinstance(event, qwen3next.Token):
            print(event.text, end="")
"""

import warnings

# torch warns on import when numpy is absent; nothing here uses numpy (a plain install has none).
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .engine import Engine, load  # noqa: E402
from .errors import Qwen3NextError, RequestError  # noqa: E402
from .request import Request, Result, Token  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Engine", "Qwen3NextError", "Request", "RequestError", "Result", "Token", "load"]
