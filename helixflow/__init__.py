"""HelixFlow: a self-hosted, OpenAI-compatible AI inference platform.

A lean Python control plane (gateway, auth, monitoring) in front of an inference pool whose
scheduler, batching and KV-cache bookkeeping are C++ (``helixflow._native``) and whose GPU
kernels are Triton (``helixflow.kernels``).
"""

# NOTE: the single source of the version: pyproject.toml reads it from here at build time.
__version__ = "0.1.0"
