"""fastgen's models: PixelCNN and Gated PixelCNN (fastgen.models.pixelcnn)."""
from fastgen.models.pixelcnn import AutoregressiveImageModel, GatedPixelCNN, PixelCNN

__all__ = ["AutoregressiveImageModel", "PixelCNN", "GatedPixelCNN"]
