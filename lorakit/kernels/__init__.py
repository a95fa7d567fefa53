"""Routed-delta kernels: the torch reference (kernels.reference) and the backend the layers call.

A fused backend (a Triton grouped GEMM, as punica and vLLM use) is one more module here providing the same four
functions, one row in backend.BACKENDS, and nothing else: tests/kernels holds every backend equal to the
reference and to each method's own `delta()`.
"""
