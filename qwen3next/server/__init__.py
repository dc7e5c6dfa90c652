"""`qwen3next serve`: the OpenAI-compatible HTTP server (Starlette + uvicorn, the `serve` extra).

api.py turns OpenAI request bodies into the library's Request; scheduler.py runs them one at a
time off a bounded queue; reply.py splits generated text into content, reasoning and tool calls;
responses.py shapes OpenAI objects and stream chunks; app.py wires the endpoints, the API key,
the body limit and the access log. Nothing here imports on `import qwen3next`.
"""

# The server's limits, here so that `qwen3next serve` shows them without importing Starlette.
MAX_QUEUE = 16  # requests that may wait behind the running one
MAX_BODY = 16 * 2**20  # bytes of request body: a long conversation is a few MB of JSON
