"""titans-train: training Titans language models (neural long-term memory) with PyTorch Lightning."""

__version__ = "0.1.0"
