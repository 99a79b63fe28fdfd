"""A compression plan over named tensors: the candidate levels (the comm layer's compressor specs), their
errors and wire bytes (levels.py), and L-GreCo's dynamic program that picks one level per tensor (dp.py)."""
