"""Outlines of 2D masks as closed SCOORD polylines in DICOM image coordinates, for SR image regions.

DICOM image coordinates are (column, row) with (0, 0) the top-left corner of the top-left pixel: pixel
[r, c] covers [c, c + 1] x [r, r + 1] and its centre is (c + 0.5, r + 0.5). An outline here runs along pixel
edges, through pixel corners, so it encloses exactly its region's pixels whatever the shape (concave, with
spurs, one pixel wide, a single pixel): the pixel centres inside the polygon are the region's pixels, and the
polygon's area is their count. Only corners are kept (a straight run of edges is one line), and every
polyline is closed: its last point repeats the first (PS3.3 C.18.6.1.2).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

# Pixels that touch at an edge or a corner belong together, as a reader sees a drawn region.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Walking directions (dx, dy) along pixel edges, each the previous turned right on screen (y grows down).
EAST, SOUTH, WEST, NORTH = (1, 0), (0, 1), (-1, 0), (0, -1)
DIRECTIONS = (EAST, SOUTH, WEST, NORTH)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2D mask (of equal ones, the first in raster order); may be empty."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def outer_boundary(region: np.ndarray) -> np.ndarray:
    """The closed outline (N x 2 float, column/row) of an 8-connected 2D region's outer edge; holes are ignored.

    Crack following: from the top-left corner of the first pixel in raster order, walk the pixel edges with
    the region on the right. At each corner the two pixels ahead decide: the one ahead on the left in the
    region means turn left (so pixels touching only at a corner stay one region), else the one ahead on the
    right means go straight, else turn right. The start corner has a single boundary edge in and one out (no
    region pixel above it or to its left), so coming back to it closes the outline.
    """
    rows, columns = np.nonzero(region)
    if rows.size == 0:
        raise ValueError("an empty region has no outline")
    inside = np.pad(np.asarray(region, dtype=bool), 1)  # reads one pixel beyond the image as background

    def is_inside(x: int, y: int, ux: int, uy: int) -> bool:
        """Whether the pixel in quadrant (ux, uy) of corner (x, y) is in the region."""
        return bool(inside[(y if uy > 0 else y - 1) + 1, (x if ux > 0 else x - 1) + 1])

    start = (int(columns[0]), int(rows[0]))
    corners = [start]
    x, y = start
    heading = 0  # east, along the first pixel's top edge
    while True:
        dx, dy = DIRECTIONS[heading]
        x, y = x + dx, y + dy
        if (x, y) == start:
            break
        # Ahead-left is the quadrant (dx + dy, dy - dx), ahead-right (dx - dy, dy + dx).
        if is_inside(x, y, dx + dy, dy - dx):
            turned = (heading - 1) % 4
        elif is_inside(x, y, dx - dy, dy + dx):
            turned = heading
        else:
            turned = (heading + 1) % 4
        if turned != heading:
            corners.append((x, y))
            heading = turned
    corners.append(start)
    return np.array(corners, dtype=float)


def convex_outline(mask: np.ndarray) -> np.ndarray:
    """The closed convex hull (N x 2 float, column/row) of all pixels of a 2D mask, whatever its components."""
    rows, columns = np.nonzero(mask & ~ndimage.binary_erosion(mask))  # inner pixels add no hull corner
    if rows.size == 0:
        raise ValueError("an empty mask has no outline")
    corners = np.concatenate([np.stack([columns + dx, rows + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    hull = corners[ConvexHull(corners).vertices].astype(float)
    return np.vstack([hull, hull[:1]])


def image_border(rows: int, columns: int) -> np.ndarray:
    """The closed outline of a whole rows x columns image."""
    return np.array([[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]], dtype=float)
