"""The models the tests and the benchmarks build, with no hub: tiny models of every supported
family (``tiny``; ``tiny_vllm``: ones vLLM's CPU backend runs), the real shapes with random
weights (``real_shapes``), the tables the benches name them by (``models`` for ``desap bench e2e``,
``vllm_models`` for the vLLM benches) and the checkpoint writer vLLM loads them from
(``checkpoint``). Nothing in the operator or the integrations imports this package."""
