"""The toy world: a procedural renderer of 32x32 scenes with one coloured, styled shape.

A scene is fully described by a :class:`Scene` (shape, colour, fill style, geometry and
pattern phase), so rendering is a pure function of the scene and sampling a scene is a
pure function of a ``numpy.random.Generator``: the same seed always gives the same image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges and patterns

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
STYLES = ("solid", "striped", "dotted", "outline")
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "style": STYLES}

COLOR_RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 210, 30),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 200),
}

# The word a caption uses for each concept, and the synonyms that may replace it.
WORDS = {
    **{shape: shape for shape in SHAPES},
    **{color: color for color in COLORS},
    "solid": "solid", "striped": "striped", "dotted": "dotted", "outline": "outlined",
}
SYNONYMS = {
    "circle": ("disk",), "square": ("box",), "triangle": ("wedge",), "star": ("pentagram",),
    "heart": ("valentine",), "cross": ("plus",),
    "red": ("crimson",), "orange": ("amber",), "yellow": ("golden",), "green": ("emerald",),
    "blue": ("azure",), "purple": ("violet",),
    "solid": ("filled",), "striped": ("lined",), "dotted": ("spotted",), "outline": ("hollow",),
}


VALUE_OF = {word: value for value, word in WORDS.items()}  # how prompts word a value -> the value ("outlined")


def values_of(concept: str) -> list[str]:
    """The toy-world values a concept or compound names ("outlined red circle" -> outline, red, circle)."""
    return [VALUE_OF.get(word, word) for word in concept.split()]


def attribute_of(concept: str) -> str:
    """The attribute ("shape", "color" or "style") a concept name belongs to."""
    for attribute, values in ATTRIBUTES.items():
        if concept in values:
            return attribute
    known = ", ".join(v for values in ATTRIBUTES.values() for v in values)
    raise ValueError(f"unknown toy-world concept {concept!r}; known concepts: {known}")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    style: str
    center: tuple[float, float]  # pixels, in the 32x32 frame
    radius: float  # pixels
    rotation: float  # degrees, counter-clockwise
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]
    pattern_angle: float  # degrees, stripe direction
    pattern_phase: tuple[float, float]  # stripe/dot grid offset, pixels

    def label(self) -> dict[str, int]:
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def sample_scene(
    rng: np.random.Generator, shape: str | None = None, color: str | None = None, style: str | None = None
) -> Scene:
    """Draw a random scene; attributes given by name are fixed, the rest are uniform."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or COLORS[rng.integers(len(COLORS))]
    style = style or STYLES[rng.integers(len(STYLES))]
    radius = float(rng.uniform(9.0, 13.0))
    margin = radius + 1.0
    center = (float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
    rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOR_RGB[color])
    gray = int(rng.integers(228, 251))
    background = tuple(int(np.clip(gray + rng.integers(-6, 7), 0, 255)) for _ in range(3))
    return Scene(
        shape=shape, color=color, style=style, center=center, radius=radius,
        rotation=float(rng.uniform(-25.0, 25.0)), rgb=rgb, background=background,
        pattern_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
        pattern_phase=(float(rng.uniform(0, 4)), float(rng.uniform(0, 5))),
    )


def _unit_outline(shape: str) -> np.ndarray:
    """Closed outline of a shape of radius about 1, as (N, 2) points with y pointing up."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    if shape == "triangle":
        t = np.deg2rad([90, 210, 330])
        return np.stack([np.cos(t), np.sin(t) - 0.15], 1) * 1.1
    if shape == "star":
        t = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, y + 2.5], 1) / 16.5
    if shape == "cross":
        a, b = 0.32, 0.95
        return np.array([[-a, b], [a, b], [a, a], [b, a], [b, -a], [a, -a], [a, -b], [-a, -b],
                         [-a, -a], [-b, -a], [-b, a], [-a, a]])
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _polygon(scene: Scene) -> list[tuple[float, float]]:
    theta = math.radians(scene.rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = _unit_outline(scene.shape) @ rot.T * scene.radius
    cx, cy = scene.center
    return [((cx + x) * SUPERSAMPLE, (cy - y) * SUPERSAMPLE) for x, y in points]


def _pattern(scene: Scene, size: int) -> np.ndarray:
    """Where the fill style puts paint inside the shape, at supersampled resolution."""
    if scene.style in ("solid", "outline"):
        return np.ones((size, size), dtype=bool)
    y, x = np.mgrid[0:size, 0:size] / SUPERSAMPLE
    if scene.style == "striped":
        angle = math.radians(scene.pattern_angle)
        across = x * math.cos(angle) + y * math.sin(angle) + scene.pattern_phase[0]
        return np.mod(across, 4.0) < 2.0
    # dotted: dots of radius 1.2 px on a 5 px grid
    gx = np.mod(x + scene.pattern_phase[0], 5.0) - 2.5
    gy = np.mod(y + scene.pattern_phase[1], 5.0) - 2.5
    return gx**2 + gy**2 < 1.2**2


def _masks(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(paint, silhouette) at supersampled resolution: where the shape's colour goes, and the whole shape
    (its outline filled, whatever its style)."""
    size = IMAGE_SIZE * SUPERSAMPLE
    polygon = _polygon(scene)
    inside = Image.new("L", (size, size), 0)
    ImageDraw.Draw(inside).polygon(polygon, fill=255)
    border_mask = Image.new("L", (size, size), 0)
    border = 2 * SUPERSAMPLE if scene.style == "outline" else SUPERSAMPLE
    ImageDraw.Draw(border_mask).line(polygon + polygon[:1], fill=255, width=border, joint="curve")
    inside, edge = np.asarray(inside) > 0, np.asarray(border_mask) > 0
    paint = (inside & _pattern(scene, size) if scene.style != "outline" else np.zeros_like(inside)) | edge
    return paint, inside | edge


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 32x32 RGB image."""
    paint, _ = _masks(scene)
    size = IMAGE_SIZE * SUPERSAMPLE
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = scene.background
    canvas[paint] = scene.rgb
    image = Image.fromarray(canvas.round().astype(np.uint8))
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def silhouette(scene: Scene) -> np.ndarray:
    """The share of each of the 32x32 pixels that the shape covers (float32, 0..1): the exact object mask a
    segmenter would approximate."""
    _, shape = _masks(scene)
    image = Image.fromarray(shape.astype(np.uint8) * 255).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255


def render_array(scenes: list[Scene]) -> np.ndarray:
    """Render scenes to a uint8 array of shape (N, 32, 32, 3)."""
    return np.stack([np.asarray(render(scene)) for scene in scenes])


def concept_scenes(concept: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rendered scenes of a concept or compound (the other values drawn) and their exact object masks:
    (images (n, 32, 32, 3) uint8, masks (n, 32, 32) float32); the ``renderer`` source of :mod:`erasure.examples`."""
    fixed = {attribute_of(value): value for value in values_of(concept)}
    rng = np.random.default_rng([seed, *concept.encode()])
    scenes = [sample_scene(rng, **fixed) for _ in range(count)]
    return render_array(scenes), np.stack([silhouette(scene) for scene in scenes])
