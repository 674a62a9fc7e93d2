"""Triton kernels for the GRPO loss. Imports only torch and triton."""
