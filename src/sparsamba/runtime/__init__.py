"""The native engine from Python: the ctypes layer over the C ABI, and the latency profiler."""
