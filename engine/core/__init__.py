"""What scheduling is made of: requests, sampling parameters, the KV cache
manager, the scheduler, outputs and counters. Imports nothing above it."""
