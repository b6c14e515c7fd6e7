"""The serving engine: core/ (requests, KV cache manager, scheduler), model/
(loaders, forward pass, runner, sampler), attention/ (torch, CPU and Triton
kernels), the engine that wires them with a KV connector (llm_engine.py), and
entrypoints/ (LLM API, async engine, OpenAI server, CLI)."""
