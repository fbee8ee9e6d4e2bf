"""The one face framing every stream and every evaluated face shares.

A face enters the model as the store's square crop (``faces.crop_square``: side 1.8x the long side
of the 68-landmark box, centre raised by 0.2 of its height) resized to the model's input size by
``resize_face``. That holds for every path: stream O's reals and fakes, stream S's reals and
self-blended fakes, validation, the test sets, ``predict`` and Grad-CAM. So the landmark box
spans the same fraction of the image (about 0.56 of the side for a frontal face), at the same
aspect and position, whichever stream or split an image comes from; a detector cannot tell the
streams apart by their zoom, and what it learns from S is seen at test time at the same scale.

Self-blended images are synthesised on the whole stored square at
``max(stored side, input size)`` pixels and only then shrunk (or kept) to the input size: the
synthesised face is never enlarged after blending, so its blending artefacts are not smoothed
by an upsampling that the test faces never get. (When the store is smaller than the input size,
every stream upsamples the stored pixels by the same factor *before* anything is synthesised.)

Why not SBI's official crops: the official code synthesises on a wide landmark crop of the full
frame and then cuts a random-margin box around the landmarks (each side w/4 or h/4 times
U(0.2, 0.8)); its test crop uses other margins. Applied to one stream only, on top of the stored
square, that made S faces 1.44x larger horizontally and 1.19x vertically than O and test faces,
and anisotropically stretched (measured on FFHQ with dlib; ``tests/test_framing.py`` now checks
that all four kinds of image agree within 3%). The random-margin crop was also SBI's only scale
augmentation; no stream has one here (it would need a stored context larger than the crop).
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_face(image: np.ndarray, size: int | None) -> np.ndarray:
  """A stored face crop at the model's input size: INTER_AREA to shrink, INTER_LINEAR to
  grow. Training (both streams), evaluation, predict and Grad-CAM all resize through this
  one function."""
  if size is None or image.shape[:2] == (size, size):
    return image
  shrink = image.shape[0] > size
  return cv2.resize(
    image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  )


def resize_landmarks(landmarks: np.ndarray, side: int, size: int) -> np.ndarray:
  """Landmarks of a ``side`` px square in the ``size`` px square of ``resize_face`` (pixel
  centres map onto pixel centres)."""
  s = size / side
  return ((np.asarray(landmarks, np.float32) + 0.5) * s - 0.5).astype(np.float32)


def landmark_box_fractions(landmarks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """(width, height, centre x, centre y) of the 68-landmark box as fractions of the image's
  width/height: the quantities the framing rule keeps equal across streams."""
  pts = np.asarray(landmarks, np.float64)[:68]
  (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
  h, w = shape[:2]
  return np.array([(x1 - x0) / w, (y1 - y0) / h, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h])
