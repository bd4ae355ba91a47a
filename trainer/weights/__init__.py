"""Weights files: the Keras-2 h5 layout, loading and inspecting by layer name, checkpoints, and
fetching pretrained weights."""
