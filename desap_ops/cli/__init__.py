"""The application layer: the ``desap`` command line (main), the demo (demo, vit_s), the benchmarks
(bench_op, bench_e2e, report) and the model zoo they run (models). It imports the library; nothing
in the library imports it."""
