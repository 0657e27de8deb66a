"""Triton kernels for the gpt-oss runtime (import name ``gptoss_kernels``).

Each module holds the kernels of one op family, a public function per op with the signature of
its PyTorch reference in ``gptoss_cli.ops``, and that reference as ``<op>_torch``:

- ``norm``: RMSNorm, and the residual add fused with it (``add_rmsnorm``);
- ``rope``: RoPE on q and k fused with the write of k, v into the KV cache (``rope_store``; for
  several sequences in a pooled cache, ``rope_store_rows``);
- ``attention``: causal GQA flash attention with sinks and a sliding window, split-K for decode;
  ``attention_rows``: one query token for each of several sequences, each in its cache row;
- ``moe``: router top-k (alone, or fused with the residual add and norm) and the MXFP4 experts'
  grouped GEMMs (prefill), dequantising in registers; ``moe_decode``: the experts' GEMVs
  (decode), held to an instruction budget (``tests/kernels_budget.py``); ``moe_batch``: the GEMVs
  of a batched decode step (5-32 tokens), each expert in use read once for all its tokens;
- ``arrive``: the counters (one buffer per engine) with which the last program of a split piece
  of work combines the parts (router, expert sum, split-K attention) in the same launch.

``gptoss_cli.ops`` picks the kernel on CUDA and the reference elsewhere (``GPTOSS_KERNELS``
overrides). Triton is imported here at module import: import these modules only where triton is
installed (``ops`` does so lazily, at the first kernel call).
"""
