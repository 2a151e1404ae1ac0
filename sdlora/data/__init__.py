"""Images and captions: find them, load them robustly, transform them, order them. No diffusers in here."""

from sdlora.data.buckets import BucketBatchSampler, assign_bucket, make_buckets
from sdlora.data.dataset import CaptionedImageDataset, collate
from sdlora.data.images import ImageLoadError, load_rgb
from sdlora.data.sampler import ResumableBatchSampler
from sdlora.data.sources import DatasetError, ImageRecord, discover, scan_sources

__all__ = [
    "BucketBatchSampler",
    "CaptionedImageDataset",
    "DatasetError",
    "ImageLoadError",
    "ImageRecord",
    "ResumableBatchSampler",
    "assign_bucket",
    "collate",
    "discover",
    "load_rgb",
    "make_buckets",
    "scan_sources",
]
