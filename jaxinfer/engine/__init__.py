"""The engine: requests, the scheduler and its page allocator (no JAX), the engine core that
steps scheduler and runner, the output processor, and offline generation (`llm.LLM`).

See `docs/engine.md` for how the pieces fit and which process runs which."""
