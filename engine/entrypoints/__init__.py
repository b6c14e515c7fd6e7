"""Ways in: the LLM Python API, the async engine behind the OpenAI server, the
server and its protocol, Prometheus metrics, the `kvtier` command."""
