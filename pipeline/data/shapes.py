"""The demo world: coloured shapes drawn procedurally, deterministic from a seed.

Each image is one shape of a named colour on a random low-saturation background, with
random position, size, rotation and pixel noise. Class names are plain English
(``"red circle"``) so a text encoder can read them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLOR_RGB = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 215),
    "yellow": (225, 205, 40),
    "purple": (145, 55, 185),
    "orange": (240, 135, 30),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
    "brown": (130, 80, 40),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring")
_SUPERSAMPLE = 4
_SPLIT_CODE = {"train": 1, "test": 2, "pretrain": 3}


def class_names(colors: list[str], shapes: list[str]) -> list[str]:
    unknown = [c for c in colors if c not in COLOR_RGB] + [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(
            f"unknown colour or shape {unknown}; colours: {sorted(COLOR_RGB)}, shapes: {list(SHAPES)}"
        )
    return [f"{c} {s}" for c in colors for s in shapes]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float = 0.0):
        pts = []
        for i in range(n):
            a = angle + offset + 2 * math.pi * i / n
            rad = radii[i % len(radii)]
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "star":
        return ring(10, [r, r * 0.42], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [r])
    if shape == "diamond":
        return ring(4, [r, r * 0.6])
    if shape == "cross":
        w = r * 0.36
        base = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]
    raise ValueError(shape)


def draw(color: str, shape: str, size: int, rng: np.random.Generator, noise: float) -> Image.Image:
    """One image of a ``color`` ``shape``; every random choice comes from ``rng``."""
    big = size * _SUPERSAMPLE
    grey = rng.uniform(0.08, 0.92)
    tint = rng.uniform(-0.06, 0.06, size=3)
    background = tuple(int(255 * float(np.clip(grey + t, 0, 1))) for t in tint)
    image = Image.new("RGB", (big, big), background)
    canvas = ImageDraw.Draw(image)
    radius = rng.uniform(0.2, 0.42) * big
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, big - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    jitter = rng.integers(-30, 31, size=3)
    fill = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOR_RGB[color], jitter))
    if shape == "circle":
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "ring":
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        inner = radius * 0.55
        canvas.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=background)
    else:
        canvas.polygon(_polygon(shape, cx, cy, radius, angle), fill=fill)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if noise > 0:
        pixels = np.asarray(image, dtype=np.float32)
        pixels += rng.normal(0.0, noise * 255.0, size=pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def sample_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """Each image has its own stream, so images do not depend on generation order."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], class_index, index])
