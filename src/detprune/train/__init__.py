"""Training engine (torchvision references/detection style) and checkpoints."""
