"""The benchmarks behind ``desap bench``: ``op`` (the operator against its reference), ``e2e`` (whole
models' prefill, timed or FLOPs counted) and ``vllm/`` (vLLM offline batches and ``vllm serve``
under load). Each module follows the one skeleton of :mod:`.skeleton` (check, plan, run, table,
figure; JSON and PNG written by ``skeleton.execute``) and returns its result as dataclasses.
``machine`` and ``flops`` hold what they share; the models come from :mod:`desap_ops.testing`."""
