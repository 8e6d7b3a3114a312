"""Batched embedding extraction over an indexed image source, resumable through ``.npy`` chunks.

Images are decoded (and aligned) on a thread pool one batch ahead of the model.
With a ``cache_dir`` the embeddings of every ``chunk_size`` images are saved as
``views-<first image>.npy`` (written to a temporary name, then renamed), so an
interrupted run restarts at the first missing chunk; a cache built for another
image count, chunk size or view count is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from sface_dist.atomic_write import atomic_open
from sface_dist.evaluation.embedder import Embedder, embed_views
from sface_dist.progress_bar import ProgressBar

ImageLoader = Callable[[int], np.ndarray]
"""Image ``index`` -> uint8 RGB ``[3, H, W]``."""

_META = "meta.json"


def extract_views(
    embed: Embedder,
    load_image: ImageLoader,
    num_images: int,
    *,
    batch_size: int,
    flip: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    chunk_size: int = 8192,
    workers: int = 4,
    progress: TextIO | None = sys.stderr,
) -> np.ndarray:
    """Embeddings ``[V, N, D]`` float32 of images ``0 .. N-1``: views (image, mirror), or the image alone."""
    if min(num_images, batch_size, chunk_size) < 1:
        raise ValueError(f"need positive num_images, batch_size, chunk_size: {num_images}, {batch_size}, {chunk_size}")
    cache = _ChunkCache(Path(cache_dir), num_images, chunk_size, 2 if flip else 1) if cache_dir else None
    starts = range(0, num_images, chunk_size)
    cached: dict[int, np.ndarray] = {}
    if cache is not None:
        for start in starts:
            views = cache.load(start)
            if views is not None:
                cached[start] = views
    done = sum(min(chunk_size, num_images - start) for start in cached)
    chunks: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, ProgressBar(num_images, stream=progress, done=done) as bar:
        for start in starts:
            if start in cached:
                chunks.append(cached[start])
                continue
            stop = min(start + chunk_size, num_images)
            views = _embed_range(embed, load_image, pool, start, stop, batch_size, flip, bar)
            if cache is not None:
                cache.save(start, views)
            chunks.append(views)
    return np.concatenate(chunks, axis=1)


def _embed_range(
    embed: Embedder,
    load_image: ImageLoader,
    pool: ThreadPoolExecutor,
    start: int,
    stop: int,
    batch_size: int,
    flip: bool,
    bar: ProgressBar,
) -> np.ndarray:
    """Views of images ``[start, stop)``, loading the next batch while the model runs on this one."""

    def submit(first: int) -> list[Future[np.ndarray]]:
        return [pool.submit(load_image, index) for index in range(first, min(first + batch_size, stop))]

    pieces = []
    pending = submit(start)
    for first in range(start, stop, batch_size):
        images = torch.from_numpy(np.stack([future.result() for future in pending]))
        pending = submit(first + batch_size)
        pieces.append(embed_views(embed, images, len(images), flip).numpy())
        bar.update(len(images))
    return np.concatenate(pieces, axis=1)


class _ChunkCache:
    """``views-<first image>.npy`` files in one folder, with a ``meta.json`` naming their layout."""

    def __init__(self, folder: Path, num_images: int, chunk_size: int, views: int) -> None:
        self.folder = folder
        self.chunk_size, self.num_images, self.views = chunk_size, num_images, views
        layout = {"num_images": num_images, "chunk_size": chunk_size, "views": views}
        meta = folder / _META
        if meta.is_file():
            found = json.loads(meta.read_text())
            if {key: found.get(key) for key in layout} != layout:
                raise ValueError(
                    f"{folder}: embedding cache made for {found}, this run needs {layout}: "
                    "delete the folder or use another output folder"
                )
        else:
            folder.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(layout, indent=2) + "\n")

    def _path(self, start: int) -> Path:
        return self.folder / f"views-{start:09d}.npy"

    def load(self, start: int) -> np.ndarray | None:
        """The cached chunk at ``start``, or None when it is missing or not of the expected shape."""
        path = self._path(start)
        if not path.is_file():
            return None
        try:
            views = np.load(path)
        except (OSError, ValueError):
            return None
        expected = min(self.chunk_size, self.num_images - start)
        return views if views.ndim == 3 and views.shape[:2] == (self.views, expected) else None

    def save(self, start: int, views: np.ndarray) -> None:
        with atomic_open(self._path(start)) as out:
            np.save(out, views.astype(np.float32, copy=False))
