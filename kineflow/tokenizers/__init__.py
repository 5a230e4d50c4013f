"""Tokenizers: text (byte-level BPE with Janus's specials) and images (discrete VQ, KL-VAE).

``autoencoder`` holds the convolutional encoder/decoder both image tokenizers share; ``vq``
quantises its latents against an L2-normalised codebook (FUDOKI's image tokens); ``kl_vae``
keeps them continuous as a diagonal Gaussian and patchifies them into tokens (UniFluid's).
"""

from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.kl_vae import AutoencoderKL, KLConfig
from kineflow.tokenizers.text import TextTokenizer, train_text_tokenizer
from kineflow.tokenizers.vq import VQConfig, VQModel

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "KLConfig",
    "TextTokenizer",
    "VQConfig",
    "VQModel",
    "train_text_tokenizer",
]
