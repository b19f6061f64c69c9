"""ucai — Constitutional AI and its mirror image, as PyTorch Lightning stages."""

__version__ = "0.1.0"
