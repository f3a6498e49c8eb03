"""Building blocks shared by the backbones, necks and heads: conv blocks, BatchNorm folding, box geometry, top-k and
NMS; ``layers.kernels`` holds the Triton kernels behind one dispatch function."""
