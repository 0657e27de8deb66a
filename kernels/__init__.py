"""Triton kernels for the gpt-oss runtime (import name ``gptoss_kernels``).

Each kernel sits beside a plain-PyTorch reference with the same signature; ``gptoss_cli.ops``
picks the kernel on CUDA and the reference elsewhere.
"""
