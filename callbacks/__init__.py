"""AccUDNN-style training callbacks: planned activation swap-out and batch-size / lr search."""

from callbacks.batch_size_lr_search import BatchSizeLRSearch
from callbacks.swap_out import SwapOutCallback

__all__ = ["BatchSizeLRSearch", "SwapOutCallback"]
