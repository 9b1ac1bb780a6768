"""The model families of ``python -m fastgen train``: registry name -> family class (family.Family). A new
family is one module and one line here."""
from fastgen.train.gan import GANFamily
from fastgen.train.pixel import PixelFamily
from fastgen.train.pixelcnnpp import PixelCNNppFamily
from fastgen.train.vae import VAEFamily

FAMILIES = {"pixelcnn": PixelFamily, "gated-pixelcnn": PixelFamily, "pixelcnnpp": PixelCNNppFamily,
            "vae": VAEFamily, "dcgan": GANFamily, "cgan": GANFamily}
