"""Scenes of the synthetic editing world: palette, scene graph, sampling and numpy rendering.

A scene is a background (colour + texture) and 1-4 objects on a 3x3 grid of cells. Each object sits in its own cell
(small jitter around the cell centre), and fits inside it, so objects never overlap and a cell identifies an object
(cells are numbered row-major, 0 = top left ... 8 = bottom right). In sampled scenes and in correct edits no two
objects share both colour and shape, so "the red circle" always names one object (a failed candidate may break
this, e.g. an object copied instead of moved). Coordinates are fractions of the image side, so any render size works
(112 by default; 64 or 32 for tiny runs).

Rendering is 2x supersampled (anti-aliased edges). A scene may carry an ``artefact`` ("noise" or "blur") that is
applied after rendering; the noise is seeded by ``Scene.seed`` so rendering is deterministic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_SIZE = 112
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "medium", "large")
SIZE_RADIUS = {"small": 0.085, "medium": 0.118, "large": 0.15}   # half extent, fraction of the image side
JITTER = 0.008                                                      # max |offset| from the cell centre
OBJECT_COLOURS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 135, 30), "purple": (140, 60, 180), "pink": (240, 120, 190), "brown": (130, 80, 40),
    "black": (25, 25, 25),
}
BACKGROUND_COLOURS = {
    "white": (245, 245, 245), "light grey": (190, 190, 190), "beige": (225, 205, 160),
    "light blue": (170, 205, 240), "light green": (180, 225, 170),
}
TEXTURES = ("plain", "stripes")
STRIPE_SHADE = 0.93          # stripes darken the background colour by this factor
ARTEFACTS = ("noise", "blur")
NOISE_STD = 18.0             # uint8 units
SUPERSAMPLE = 2
PATCH_CUT = -0.2             # partial recolour: the left part u < PATCH_CUT (object units) keeps the patch colour

CELL_NAMES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")


def cell_centre(cell: int) -> tuple[float, float]:
    """(x, y) centre of a cell, as fractions of the image side."""
    r, c = divmod(int(cell), 3)
    return (c + 0.5) / 3.0, (r + 0.5) / 3.0


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, size level, cell, jitter (dx, dy) and an optional patch colour.

    ``patch`` marks a partial recolour: the left part of the object keeps that (old) colour.
    """
    shape: str
    colour: str
    size: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0
    patch: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Obj.shape: expected one of {SHAPES}, got {self.shape!r}")
        if self.colour not in OBJECT_COLOURS:
            raise ValueError(f"Obj.colour: expected one of {tuple(OBJECT_COLOURS)}, got {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"Obj.size: expected one of {SIZES}, got {self.size!r}")
        if not 0 <= int(self.cell) <= 8:
            raise ValueError(f"Obj.cell: expected 0..8, got {self.cell!r}")
        if self.patch is not None and self.patch not in OBJECT_COLOURS:
            raise ValueError(f"Obj.patch: expected None or an object colour, got {self.patch!r}")
        if max(abs(self.dx), abs(self.dy)) > JITTER + 1e-9:
            raise ValueError(f"Obj jitter ({self.dx}, {self.dy}) exceeds {JITTER}")

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Scene graph: background colour and texture, objects (one per cell), optional render artefact."""
    background: str
    objects: tuple = field(default_factory=tuple)
    texture: str = "plain"
    artefact: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"Scene.background: expected one of {tuple(BACKGROUND_COLOURS)}, got {self.background!r}")
        if self.texture not in TEXTURES:
            raise ValueError(f"Scene.texture: expected one of {TEXTURES}, got {self.texture!r}")
        if self.artefact is not None and self.artefact not in ARTEFACTS:
            raise ValueError(f"Scene.artefact: expected None or one of {ARTEFACTS}, got {self.artefact!r}")
        objs = tuple(sorted(self.objects, key=lambda o: o.cell))
        object.__setattr__(self, "objects", objs)
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene: two objects share a cell: cells {cells}")

    def at(self, cell: int) -> Obj | None:
        for o in self.objects:
            if o.cell == cell:
                return o
        return None

    def find(self, colour: str, shape: str) -> Obj | None:
        for o in self.objects:
            if o.colour == colour and o.shape == shape:
                return o
        return None

    @property
    def cells(self) -> set:
        return {o.cell for o in self.objects}

    def empty_cells(self) -> list:
        return [c for c in range(9) if c not in self.cells]

    def replace(self, **kw) -> "Scene":
        return dataclasses.replace(self, **kw)

    def with_objects(self, objects) -> "Scene":
        return dataclasses.replace(self, objects=tuple(objects))

    def to_dict(self) -> dict:
        return {"background": self.background, "texture": self.texture, "artefact": self.artefact,
                "seed": int(self.seed), "objects": [dataclasses.asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(background=d["background"], texture=d.get("texture", "plain"), artefact=d.get("artefact"),
                     seed=int(d.get("seed", 0)), objects=tuple(Obj(**o) for o in d.get("objects", ())))


def as_scene(x: Any) -> Scene:
    """Accept a `Scene` or its ``to_dict()`` form."""
    if isinstance(x, Scene):
        return x
    if isinstance(x, dict):
        return Scene.from_dict(x)
    raise TypeError(f"expected a Scene or a scene dict, got {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
def random_jitter(rng: np.random.Generator) -> tuple[float, float]:
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    return float(round(dx, 4)), float(round(dy, 4))


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """A random scene: background, texture (30 % stripes) and 1-4 objects with unique (colour, shape)."""
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    used, objs = set(), []
    for cell in cells:
        while True:
            colour = str(rng.choice(list(OBJECT_COLOURS)))
            shape = str(rng.choice(SHAPES))
            if (colour, shape) not in used:
                break
        used.add((colour, shape))
        dx, dy = random_jitter(rng)
        objs.append(Obj(shape=shape, colour=colour, size=str(rng.choice(SIZES)), cell=int(cell), dx=dx, dy=dy))
    return Scene(background=str(rng.choice(list(BACKGROUND_COLOURS))), objects=tuple(objs),
                 texture="stripes" if rng.random() < 0.3 else "plain", seed=int(rng.integers(0, 2**31 - 1)))


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------
def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in object units (u right, v down, extent <= 1 along each axis)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":   # apex up at v=-1, base at v=0.72 with half-width 0.95
        return (v >= -1.0) & (v <= 0.72) & (np.abs(u) <= 0.95 * (v + 1.0) / 1.72)
    raise ValueError(f"unknown shape {shape!r}")


def object_masks(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full mask, patch mask) of an object on a grid of image-fraction coordinates xs[W], ys[H] -> [H, W]."""
    cx, cy = cell_centre(obj.cell)
    r = SIZE_RADIUS[obj.size]
    u = (xs[None, :] - (cx + obj.dx)) / r
    v = (ys[:, None] - (cy + obj.dy)) / r
    full = shape_mask(obj.shape, u, v)
    patch = full & (u < PATCH_CUT) if obj.patch is not None else np.zeros_like(full)    # 31-38 % of the area
    return full, patch


def _grid(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def gaussian_blur(img_hwc: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an [H, W, C] float array (edge padding)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    out = img_hwc
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return out


def blur_sigma(size: int) -> float:
    """Std (pixels) of the "blur" artefact for an image side of ``size``."""
    return max(1.4, size / 70.0)


def render(scene: Scene | dict, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render a scene to a uint8 image [size, size, 3] (HWC)."""
    scene = as_scene(scene)
    n = int(size) * SUPERSAMPLE
    grid = _grid(n)
    bg = np.array(BACKGROUND_COLOURS[scene.background], np.float32)
    img = np.broadcast_to(bg, (n, n, 3)).copy()                              # img_hwc at supersampled size
    if scene.texture == "stripes":
        period = max(4, n // 7)
        band = ((np.arange(n)[:, None] + np.arange(n)[None, :]) // (period // 2)) % 2 == 1
        img[band] *= STRIPE_SHADE
    for obj in scene.objects:
        cx, cy = cell_centre(obj.cell)
        r = SIZE_RADIUS[obj.size] + 2.0 / n
        # only the object's bounding box is tested
        x0, x1 = max(0, int((cx + obj.dx - r) * n)), min(n, int(np.ceil((cx + obj.dx + r) * n)) + 1)
        y0, y1 = max(0, int((cy + obj.dy - r) * n)), min(n, int(np.ceil((cy + obj.dy + r) * n)) + 1)
        full, patch = object_masks(obj, grid[x0:x1], grid[y0:y1])
        box = img[y0:y1, x0:x1]
        box[full] = OBJECT_COLOURS[obj.colour]
        if obj.patch is not None:
            box[patch] = OBJECT_COLOURS[obj.patch]
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))   # box downsample -> [H, W, 3]
    if scene.artefact == "blur":
        img = gaussian_blur(img, blur_sigma(size))
    elif scene.artefact == "noise":
        rng = np.random.default_rng([int(scene.seed), 7919])
        img = img + rng.normal(0.0, NOISE_STD, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
