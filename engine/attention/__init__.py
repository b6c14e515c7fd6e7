"""Paged attention: the torch path with its per-step metadata (paged.py), the
CPU decode kernel (cpu_kernel.py, C++ in csrc/), the Triton kernel (triton_kernel.py)."""
