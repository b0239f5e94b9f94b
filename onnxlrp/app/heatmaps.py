"""Relevance as a picture: colormaps as small lookup tables, symmetric normalisation around zero, overlays."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import LrpError

# Colour stops (position in 0..255, RGB hex), the same as Zennit's maps of these names.
STOPS: dict[str, tuple[tuple[int, str], ...]] = {
    "bwr": ((0, "0000ff"), (128, "ffffff"), (255, "ff0000")),            # blue, white at zero, red
    "coldnhot": ((0, "00ffff"), (64, "0000ff"), (128, "000000"),          # cyan, blue, black at zero,
                 (170, "ff0000"), (212, "ffff00"), (255, "ffffff")),      # red, yellow, white
    "seismic": ((0, "0000d0"), (128, "d0d0d0"), (255, "d00000")),         # bwr, darker
    "gray": ((0, "000000"), (255, "ffffff")),                             # black to white, zero is gray
}
CMAPS = tuple(STOPS)


def lookup_table(cmap: str) -> np.ndarray:
    """The colormap as 256 RGB rows (uint8), linear between its stops."""
    if cmap not in STOPS:
        raise LrpError(f"unknown colormap '{cmap}' (colormaps: {', '.join(CMAPS)})")
    positions = [p for p, _ in STOPS[cmap]]
    colors = np.array([[int(c[i:i + 2], 16) for i in (0, 2, 4)] for _, c in STOPS[cmap]], dtype=np.float64)
    steps = np.arange(256)
    return np.stack([np.interp(steps, positions, colors[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)


def to_plane(relevance: np.ndarray, channel_axis: int = 0) -> np.ndarray:
    """One relevance value per pixel: [H, W] as is, [C, H, W] (or channels at `channel_axis`) summed over
    channels, a vector [F] as one row."""
    relevance = np.asarray(relevance, dtype=np.float64)
    if relevance.ndim == 1:
        return relevance[None, :]
    if relevance.ndim == 3:
        return relevance.sum(axis=channel_axis)
    if relevance.ndim == 2:
        return relevance
    raise LrpError(f"heatmap: relevance of shape {list(relevance.shape)} is not one sample "
                   "([H, W], [C, H, W] or [F])")


def normalize(plane: np.ndarray) -> np.ndarray:
    """Values in [-1, 1], divided by the largest magnitude: zero stays zero (the colormap's centre)."""
    largest = float(np.abs(plane).max()) if plane.size else 0.0
    return plane / largest if largest > 0 else np.zeros_like(plane)


def heatmap(relevance: np.ndarray, cmap: str = "bwr", image: np.ndarray | Image.Image | None = None,
            channel_axis: int = 0) -> np.ndarray:
    """An uint8 RGB picture [H, W, 3] of one sample's relevance (see `to_plane`), normalised symmetrically so
    that zero relevance gets the colormap's centre. With `image` (uint8 or 0..1 floats, gray or RGB, resized to
    the heatmap when needed), the colours are blended over a gray copy of it, more opaque where |R| is larger."""
    values = normalize(to_plane(relevance, channel_axis))
    table = lookup_table(cmap)
    colored = table[np.round((values + 1) * 127.5).astype(np.int64)]
    if image is None:
        return colored
    background = _gray_rgb(image, values.shape)
    weight = np.sqrt(np.abs(values))[..., None]
    return np.round(weight * colored + (1 - weight) * background).astype(np.uint8)


def _gray_rgb(image: np.ndarray | Image.Image, shape: tuple[int, int]) -> np.ndarray:
    """The image as a gray RGB float array of `shape` (height, width), values 0..255."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise LrpError(f"heatmap: image of shape {list(array.shape)} is not [H, W] or [H, W, 3]")
        if array.dtype != np.uint8:
            array = np.clip(np.asarray(array, dtype=np.float64) * 255, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    gray = image.convert("L")
    if gray.size != (shape[1], shape[0]):
        gray = gray.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(gray, dtype=np.float64)[..., None], 3, axis=2)
