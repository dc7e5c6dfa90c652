"""Where routed experts live: the expert-store interface and its implementations."""
