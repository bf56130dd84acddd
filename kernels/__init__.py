"""Triton kernels of DeSAP, installed as ``desap_ops.kernels``: one kernel family per module.

- ``similarity``: decoupled similarity and text reduction -> task scores (launch 1).
- ``selection``: two-stage top-K selection and nearest-kept assignment (launch 2).
- ``merge``: mean merge of each group (launch 3) and its backward.
"""
