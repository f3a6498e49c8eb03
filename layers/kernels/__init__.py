"""Triton kernels (focal loss, greedy NMS, anchor matching) and :func:`dispatch.use_kernel`, which decides where
each one runs; every kernel has a PyTorch path that gives the same results."""
