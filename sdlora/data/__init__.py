"""Images and captions: find them, load them robustly, transform them, order them. No diffusers in here."""

from sdlora.data.dataset import CaptionedImageDataset, collate
from sdlora.data.images import ImageLoadError, load_rgb
from sdlora.data.sampler import ResumableBatchSampler
from sdlora.data.sources import DatasetError, ImageRecord, discover

__all__ = [
    "CaptionedImageDataset",
    "DatasetError",
    "ImageLoadError",
    "ImageRecord",
    "ResumableBatchSampler",
    "collate",
    "discover",
    "load_rgb",
]
