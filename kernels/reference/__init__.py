"""Torch reference implementations of every kernel in ``helixflow.kernels``.

Plain torch, no Triton: they define what each kernel computes, they are the CPU path of the
dispatch layer, and the tests compare every kernel against them.
"""
