"""The benchmarks behind ``desap bench``: ``op`` (the operator against its reference), ``e2e`` (whole
models' prefill, timed or FLOPs counted) and ``vllm/`` (vLLM offline batches and ``vllm serve``
under load). Each bench module follows the one skeleton of :mod:`.skeleton` (check, plan, run,
table, figure; JSON and PNG written by ``skeleton.execute``) and returns its result as dataclasses;
the larger ones keep each job in a module of its own (``e2e_*``, ``vllm/serve_*``) behind the bench's
module. :mod:`.arguments` holds the argument checks and the one-line error that ``desap_ops.cli``
imports too (the command line sits above the benchmarks; nothing here imports it); ``machine`` and
``flops`` hold what the benches share; the models come from :mod:`desap_ops.testing`."""
