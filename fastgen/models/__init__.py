"""fastgen's models: PixelCNN and Gated PixelCNN (fastgen.models.pixelcnn), PixelCNN++
(fastgen.models.pixelcnnpp), the VAE (fastgen.models.vae), DCGAN's generator and discriminator
(fastgen.models.dcgan)."""
from fastgen.models.dcgan import DCGANDiscriminator, DCGANGenerator
from fastgen.models.pixelcnn import AutoregressiveImageModel, GatedPixelCNN, PixelCNN
from fastgen.models.pixelcnnpp import PixelCNNpp
from fastgen.models.vae import VAE

__all__ = ["AutoregressiveImageModel", "PixelCNN", "GatedPixelCNN", "PixelCNNpp", "VAE", "DCGANGenerator",
           "DCGANDiscriminator"]
