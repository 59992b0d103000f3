"""``helixflow.kernels``: Triton kernels, each beside its torch reference.

This directory is installed as ``helixflow.kernels`` (see ``wheel.packages`` in
pyproject.toml). The kernels arrive with a later issue.
"""
