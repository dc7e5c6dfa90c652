"""qwen3next: run Qwen3-Next mixture-of-experts models locally."""

__version__ = "0.1.0"
