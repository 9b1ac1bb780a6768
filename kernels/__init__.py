"""Triton kernels, installed as fastgen.kernels (never as a top-level `kernels`).

Import a kernel module only after deciding on TRITON_INTERPRET: Triton reads it
when the kernels are decorated."""
