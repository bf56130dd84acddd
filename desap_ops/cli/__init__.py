"""The ``desap`` command line and nothing else: ``main`` wires the commands, each a module with
``add_parser`` and ``run`` (``demo``, its running and drawing halves ``demo_run`` and ``demo_draw``
and the ViT it runs, ``vit_s``; ``bench``, over :mod:`desap_ops.benchmarks`); the one-line error and the
argument checks commands and benchmarks share live below, in :mod:`desap_ops.benchmarks.arguments`."""
