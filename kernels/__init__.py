"""Triton kernels for refusal-fast, one kernel per module, each with a float64 torch reference.

Modules: ``accumulate`` (grouped sums), ``project`` (fused rank-k projection / steering),
``project_rows`` (per-row basis). Importing a module imports triton when installed; set
``TRITON_INTERPRET=1`` before that to run the kernels on CPU tensors. Use them through
``refusal_fast.ops``, which validates input and picks the backend.
"""
