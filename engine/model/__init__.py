"""The model: loaders (GGUF, HF directories), the forward pass over the paged
pool, linear layers, the runner that turns a scheduled step into tensors, the sampler."""
