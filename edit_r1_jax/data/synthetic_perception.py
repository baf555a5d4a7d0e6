"""Pixel-level perception for the gold verifier: image -> `View` (what is in each cell, background, artefact).

The editor produces pixels, not scene graphs, so its gold score needs a verifier that looks at the image. Since
every object of the world lives in its own cell of a 3x3 grid, perception is per cell:

1. noise is measured as the robust std of (image - 3x3 median filtered image); when it is above `NOISE_THRESHOLD`
   the filtered image is read instead of the image; every pixel is classified to the nearest palette colour
   (object colours, background colours and their stripe shades);
2. background = the most common background-palette label;
3. in each cell, the object pixels are those labelled with an object colour; fewer than `MIN_AREA_FRACTION` of the
   smallest object's area means the cell is empty;
4. colour = majority label of the eroded object core; a second colour covering at least `PATCH_FRACTION` of the
   core is a patch (a half-done recolour); the object's coverage per pixel is then d_bg / (d_obj + d_bg) from the
   colour distances to the background and to the object's colour(s) (1 inside, 1/2 on a half-covered edge pixel,
   0 on background; this keeps the area right when edges are soft);
5. artefact: "noise" if the noise is above `NOISE_THRESHOLD`; otherwise "blur" if the pixels that mix object and
   background colour (mixing 0.2-0.8) exceed `BLUR_THRESHOLD` per object-perimeter pixel (a sharp anti-aliased
   edge leaves about one per edge pixel, a blurred one several).
   With blur the core is eroded further before reading the colours (blurred rims are not patches);
6. shape and size = the template (4 shapes x 3 sizes, anti-aliased, centred on the coverage centroid; blurred like
   the image when blur was found) with the highest soft IoU against the coverage.

The verdicts then come from the same checks as the scene-graph verifier (`synthetic_principles.evaluate_check`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from edit_r1_jax.data.synthetic_principles import ObjView, View
from edit_r1_jax.data.synthetic_scene import (BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZE_RADIUS, SIZES,
                                              STRIPE_SHADE, blur_sigma, cell_centre, gaussian_blur, shape_mask)

MIN_AREA_FRACTION = 0.25      # of the smallest object's area (small triangle)
PATCH_FRACTION = 0.12         # of the object core
NOISE_THRESHOLD = 5.0         # robust std of the median-filter residual, uint8 units
BLUR_THRESHOLD = 1.9          # colour-mixing pixels per object-perimeter pixel

_OBJ_NAMES = tuple(OBJECT_COLOURS)
_BG_NAMES = tuple(BACKGROUND_COLOURS)
# palette rows: object colours, background colours, background stripe shades
_PALETTE = np.array([OBJECT_COLOURS[n] for n in _OBJ_NAMES] + [BACKGROUND_COLOURS[n] for n in _BG_NAMES]
                    + [tuple(STRIPE_SHADE * np.array(BACKGROUND_COLOURS[n])) for n in _BG_NAMES], np.float64)
_NAMES = _OBJ_NAMES + _BG_NAMES + _BG_NAMES
_N_OBJ = len(_OBJ_NAMES)


def _as_uint8_image(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"perceive: expected an HWC RGB(A) image, got shape {img.shape}")
    img = img[..., :3]
    if np.issubdtype(img.dtype, np.floating):
        if img.size and float(img.min()) < -1e-3:
            raise ValueError(f"perceive: float image has negative values (min {float(img.min()):.3f}); expected "
                             f"[0, 1] or [0, 255] (map a [-1, 1] decoder output with (x + 1) / 2 first)")
        scale = 255.0 if img.max(initial=0.0) <= 1.0 + 1e-6 else 1.0
        img = np.clip(np.rint(img * scale), 0, 255)
    return img.astype(np.uint8)


def median3(img_hwc: np.ndarray) -> np.ndarray:
    """3x3 median filter per channel (edge padding) of a uint8 image."""
    h, w = img_hwc.shape[:2]
    p = np.pad(img_hwc, ((1, 1), (1, 1), (0, 0)), mode="edge")
    v = [p[i:i + h, j:j + w] for i in range(3) for j in range(3)]
    # median of 9 by a min/max exchange network (19 exchanges; no sort, no BLAS)
    for a, b in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
                 (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)):
        v[a], v[b] = np.minimum(v[a], v[b]), np.maximum(v[a], v[b])
    return v[4]


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    for _ in range(k):
        p = np.pad(mask, 1, constant_values=False)
        mask = mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def _perimeter(mask: np.ndarray) -> int:
    return int((mask & ~_erode(mask, 1)).sum())


@lru_cache(maxsize=None)
def _centroid_offset(shape: str) -> tuple[float, float]:
    """Centroid of a shape relative to its centre, in object units."""
    g = (np.arange(400) + 0.5) / 200.0 - 1.0
    m = shape_mask(shape, g[None, :], g[:, None])
    ys, xs = np.nonzero(m)
    return float(g[xs].mean()), float(g[ys].mean())


def _cell_bounds(cell: int, h: int, w: int) -> tuple[int, int, int, int]:
    r, c = divmod(cell, 3)
    return round(r * h / 3), round((r + 1) * h / 3), round(c * w / 3), round((c + 1) * w / 3)


def _smallest_area_px(h: int, w: int) -> float:
    r = SIZE_RADIUS["small"]
    return 0.5 * 1.9 * 1.72 * r * r * h * w       # small triangle


_PAL32 = _PALETTE.astype(np.float32)


def classify(img_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label index into the palette names [H, W], distance to that palette colour [H, W])."""
    x = img_hwc.reshape(-1, 3).astype(np.float32)                              # [HW, 3]
    d2 = sum((x[:, c:c + 1] - _PAL32[None, :, c]) ** 2 for c in range(3))     # [HW, P], no BLAS
    lab = d2.argmin(-1)
    return lab.reshape(img_hwc.shape[:2]), np.sqrt(d2.min(-1)).reshape(img_hwc.shape[:2])


def _template(shape: str, size: str, cx: float, cy: float, gx: np.ndarray, gy: np.ndarray, ss: int = 4) -> np.ndarray:
    """Coverage (fraction of ``ss x ss`` sub-samples inside the shape) of a template centred at (cx, cy), on the
    pixel grid with centres gx[W], gy[H] (image fractions) -> [H, W] float."""
    r = SIZE_RADIUS[size]
    step = (gx[1] - gx[0]) if gx.size > 1 else 1.0
    offs = ((np.arange(ss) + 0.5) / ss - 0.5) * step
    sx = (gx[:, None] + offs[None, :]).ravel()                       # [W*ss]
    sy = (gy[:, None] + offs[None, :]).ravel()                       # [H*ss]
    m = shape_mask(shape, (sx[None, :] - cx) / r, (sy[:, None] - cy) / r)
    return m.reshape(gy.size, ss, gx.size, ss).mean(axis=(1, 3))


def _match_template(alpha: np.ndarray, y0: int, x0: int, h: int, w: int, sigma: float) -> tuple[str, str, float]:
    """(shape, size, soft IoU) of the best template for an object's coverage map inside the cell box at (y0, x0).

    ``alpha`` is the observed object coverage in [0, 1] per pixel. Templates are anti-aliased coverages (4x4
    sub-samples) centred on alpha's centroid and, with ``sigma > 0`` (a blurred image), blurred the same way, so
    that soft or rounded edges are expected rather than taken for another shape. Soft IoU = sum(min) / sum(max).
    """
    total = alpha.sum()
    gy = (np.arange(y0, y0 + alpha.shape[0]) + 0.5) / h
    gx = (np.arange(x0, x0 + alpha.shape[1]) + 0.5) / w
    cy = float((alpha.sum(1) * gy).sum() / total)
    cx = float((alpha.sum(0) * gx).sum() / total)
    best = ("circle", "small", -1.0)
    for shape in SHAPES:
        ox, oy = _centroid_offset(shape)
        for size in SIZES:
            r = SIZE_RADIUS[size]
            cov = _template(shape, size, cx - ox * r, cy - oy * r, gx, gy)
            if sigma > 0:
                cov = gaussian_blur(cov[..., None], sigma)[..., 0]
            iou = np.minimum(cov, alpha).sum() / max(np.maximum(cov, alpha).sum(), 1e-6)
            if iou > best[2]:
                best = (shape, size, float(iou))
    return best


def _transitions(medf: np.ndarray, lab: np.ndarray, obj_idx: int, patch_idx: int | None, bg_rgb: np.ndarray) -> int:
    """Pixels of a cell that sit between the object colour and the background colour (mixing 0.2..0.8, close to the
    line joining the two colours): about one per edge pixel for a sharp anti-aliased edge, several when blurred."""
    o = _PAL32[obj_idx]
    d = o - bg_rgb
    diff = medf - bg_rgb
    alpha = (diff @ d) / max(float(d @ d), 1.0)
    off = np.sqrt(((diff - alpha[..., None] * d) ** 2).sum(-1))
    mixed = (alpha > 0.2) & (alpha < 0.8) & (off < 25.0)
    if patch_idx is not None:
        mixed &= lab != patch_idx
    return int(mixed.sum())


def _core_colours(lab: np.ndarray, rough: np.ndarray, erode: int) -> tuple[int, int | None]:
    """(majority object colour, patch colour or None) of the eroded object core of a cell."""
    for k in range(erode, -1, -1):      # erode less when the object is too small for the full erosion
        core = _erode(rough, k)
        if core.sum() >= 0.1 * rough.sum():
            break
    counts = np.bincount(lab[core], minlength=_N_OBJ)[:_N_OBJ]
    order = np.argsort(counts)[::-1]
    patch = int(order[1]) if counts[order[1]] >= PATCH_FRACTION * core.sum() else None
    return int(order[0]), patch


def perceive(image, return_stats: bool = False):
    """Image (HWC, uint8 or float in [0, 1]) -> `View`; with ``return_stats`` also a dict of diagnostics."""
    img = _as_uint8_image(image)
    h, w = img.shape[:2]
    med = median3(img)
    noise = float(np.median(np.abs(img.astype(np.int16) - med.astype(np.int16))) * 1.4826)
    if noise <= NOISE_THRESHOLD:
        med = img                     # the median filter rounds corners: use it only against noise
    medf = med.astype(np.float32)
    lab, _ = classify(med)
    is_obj = lab < _N_OBJ
    bg_counts = np.bincount((lab[~is_obj] - _N_OBJ).ravel(), minlength=2 * len(_BG_NAMES))
    bg_idx = int((bg_counts[:len(_BG_NAMES)] + bg_counts[len(_BG_NAMES):]).argmax())
    background = _BG_NAMES[bg_idx]
    bg_rgb = _PAL32[[_N_OBJ + bg_idx, _N_OBJ + len(_BG_NAMES) + bg_idx]]                  # plain and stripe shade
    d_bg = np.sqrt(((medf[:, :, None, :] - bg_rgb[None, None]) ** 2).sum(-1)).min(-1)   # [H, W]
    min_px = MIN_AREA_FRACTION * _smallest_area_px(h, w)
    blur_erode = int(np.ceil(2.0 * blur_sigma(max(h, w))))

    found = []   # (cell, box, colour idx, patch idx, refined mask)
    for cell in range(9):
        y0, y1, x0, x1 = _cell_bounds(cell, h, w)
        rough = is_obj[y0:y1, x0:x1]
        if rough.sum() < min_px:
            continue
        sharp = _core_colours(lab[y0:y1, x0:x1], rough, 1)
        blurred = _core_colours(lab[y0:y1, x0:x1], rough, blur_erode)
        colour, patch = sharp
        # coverage: how far each pixel sits from the background towards the object's colour(s)
        obj_rgb = _PAL32[[colour] + ([patch] if patch is not None else [])]
        d_obj = np.sqrt(((medf[y0:y1, x0:x1, None, :] - obj_rgb[None, None]) ** 2).sum(-1)).min(-1)
        alpha = d_bg[y0:y1, x0:x1] / np.maximum(d_obj + d_bg[y0:y1, x0:x1], 1e-6)     # [h, w] in [0, 1]
        if (alpha >= 0.5).sum() >= min_px:
            found.append((cell, (y0, y1, x0, x1), sharp, blurred, alpha))

    perimeter = sum(_perimeter(a >= 0.5) for *_, a in found)
    # colours from the deeply eroded core: a blurred rim is not mistaken for a patch there
    mixed = sum(_transitions(medf[y0:y1, x0:x1], lab[y0:y1, x0:x1], c, p, bg_rgb[0])
                for _, (y0, y1, x0, x1), _, (c, p), _ in found)
    blur_ratio = mixed / max(perimeter, 1)
    artefact = "noise" if noise > NOISE_THRESHOLD else ("blur" if blur_ratio > BLUR_THRESHOLD else None)
    sigma = blur_sigma(max(h, w)) if artefact == "blur" else 0.0

    cells, stats = {}, {"noise": noise, "blur_ratio": blur_ratio, "iou": {}}
    for cell, (y0, y1, x0, x1), sharp, blurred, alpha in found:
        c, p = blurred if artefact == "blur" else sharp
        shape, size, iou = _match_template(alpha, y0, x0, h, w, sigma)
        cells[cell] = ObjView(_OBJ_NAMES[c], shape, size, _OBJ_NAMES[p] if p is not None else None)
        stats["iou"][cell] = iou
    view = View(background=background, cells=cells, artefact=artefact)
    return (view, stats) if return_stats else view


def expected_cell_box(cell: int, size: str, image_size: int) -> list:
    """Pixel box [x0, y0, x1, y1] of an object of ``size`` centred in ``cell`` (for reasoning texts)."""
    cx, cy = cell_centre(cell)
    r = SIZE_RADIUS[size]
    return [int(round((cx - r) * image_size)), int(round((cy - r) * image_size)),
            int(round((cx + r) * image_size)), int(round((cy + r) * image_size))]
