"""`qwen3next serve`: the OpenAI-compatible HTTP server (Starlette + uvicorn, the `serve` extra).

api.py turns OpenAI request bodies into the library's Request; scheduler.py runs them one at a
time off a bounded queue; reply.py splits generated text into content, reasoning and tool calls;
responses.py shapes OpenAI objects and stream chunks; app.py wires the endpoints, the API key,
the body limit and the access log. Nothing here imports on `import qwen3next`.
"""
