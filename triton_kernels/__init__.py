"""Triton kernels of attnkern, installed as `attnkern.triton_kernels`."""
