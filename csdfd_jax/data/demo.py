"""Procedural demo data: drawn faces with exact landmarks, as a face store (SPEC contract 5).

A small, download-free dataset on which training and evaluation run end to end, designed so that
the CS-DFD setting can show on it: the training fakes carry one generator's own trace, the unseen
fakes carry the blending traces that self-blended images (SBI) teach, and nothing else. Whether a
method then fits the source, generalises or suffers from stream conflict is measured, not built
in; at demo scale (a tiny network trained from scratch for a minute) the SBI stream learns slowly.

Faces are drawn with OpenCV from a small 3-D point model (jaw, brows, nose, eyes, mouth, forehead
and hair contours) under a random pose (yaw, pitch, roll), scale, position and a weak directional
light, with per-identity traits (skin tone, face shape, eye/nose/mouth sizes, iris, hair colour
and style, clothes) on a textured background. Skin is nearly flat-shaded but carries a fine
per-identity grain (`skin_grain`): without texture, a resampled or sharpened skin region (SBI's
source augmentation, a face swap's resolution drop) would look exactly like the original. The
68 landmarks are the projected model points themselves, in dlib's order (jaw 0-16 from the
subject's right ear, i.e. image left, brows 17-26, nose bridge 27-30, nostrils 31-35, eyes 36-47,
outer lips 48-59, inner lips 60-67), so they are exact by construction. Drawing is done at twice
the size (sub-pixel vertices) and area-downsampled; every frame then goes through the same
"camera" (sensor noise and a JPEG pass standing for video compression), reals and fakes alike.
The default store is 64 px, the demo's input size, so SBI synthesises at the resolution the
network sees (as SBI does on real data) and the store is cheap to generate.

Each media id is a "video" of one identity: a fixed scene, a base pose, and `frames` frames with a
small pose jitter, talking mouth and blinks. Fake generators ("families", store domain = name):

- "gan" (dataset "demo": train/val/test, identities disjoint across splits; media id
  "<id>_gan"): a neural-rendering reenactment. The target's own face is re-rendered at full
  resolution, same light, with another mouth and gaze, plus the generator's upsampling
  fingerprint (`fingerprint`: a grid of soft dots of period 6 px, 4-7 grey levels, its phase
  fixed per video), and pasted through a wide, very soft face mask. No identity, colour or
  sharpness seam: the periodic trace is the only evidence, and it survives the camera pass and
  a 2x area shrink (a 2 px checkerboard would not). A small network learns it in tens of steps.
- "swap" (dataset "demo_unseen", test only, new identities; media id "<target>_<source>" as in
  FaceForensics++): a face swap. The inner face of another identity, rendered in the target's
  pose, aligned by a similarity fit on the inner landmarks, at a lower resolution
  (autoencoder-like blur), with an incomplete colour correction, pasted through a blurred hull
  mask: the traces of Deepfakes/FaceSwap and of SBI (blend boundary, colour and resolution
  mismatch), and no fingerprint. It is the cross-manipulation test of the demo table.
- "reenact" (only on request, `families=`): the mouth region from another expression at quarter
  resolution, upsampled with a 2 px checkerboard, pasted through a nearly hard ellipse; with
  "swap" it gives the K-stream tests a second manipulation stream.

`families` chooses the generators of dataset "demo" (default ("gan",)); "demo_unseen" always
holds "swap" fakes, so a "demo" with "swap" in it no longer has an unseen manipulation. Fakes
come with their blend mask (`mask_path`). Everything is a pure function of `seed`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from csdfd_jax.data import store as store_lib

SS = 2  # supersampling factor of the drawing canvas
FAMILY_DOMAIN = {"gan": "gan", "swap": "swap", "reenact": "reenact"}  # generator -> store domain
DEFAULT_FAMILIES = ("gan",)  # the fakes of dataset "demo"; "demo_unseen" has "swap"
DESIGN = 2  # recorded in the store summary: stores of the first design (swap / reenact) differ
SKIN_TONES = np.array(
  [
    (255, 224, 196),
    (241, 194, 167),
    (224, 172, 138),
    (198, 134, 96),
    (161, 102, 68),
    (114, 72, 48),
    (236, 188, 150),
    (250, 210, 180),
  ],
  np.float32,
)
HAIR_COLOURS = np.array(
  [(30, 22, 18), (70, 45, 28), (120, 80, 45), (200, 165, 110), (150, 60, 30), (110, 110, 110)],
  np.float32,
)
IRIS_COLOURS = np.array([(70, 45, 25), (40, 80, 130), (70, 110, 70), (110, 90, 50)], np.float32)


@dataclasses.dataclass(frozen=True)
class Identity:
  """Per-identity traits, in face units (half face width ~ 1, y down, eye line at y = 0)."""

  skin: np.ndarray
  hair: np.ndarray
  iris: np.ndarray
  lips: np.ndarray
  clothes: np.ndarray
  face_w: float
  chin_y: float
  chin_power: float
  head_top: float
  hairline: float
  hair_style: int  # 0 short, 1 long, 2 bald
  eye_x: float
  eye_w: float
  eye_h: float
  brow_y: float
  brow_t: float
  nose_y: float
  nose_w: float
  mouth_y: float
  mouth_w: float
  lip_t: float
  moles: np.ndarray  # [K, 2] positions in face units
  grain: float  # skin texture contrast (std of the multiplicative grain)
  grain_seed: int  # the skin texture's noise field


@dataclasses.dataclass(frozen=True)
class Scene:
  """Per-video constants: background texture, base pose, placement and light."""

  background: np.ndarray  # uint8 [S, S, 3] at the output size
  yaw: float
  pitch: float
  roll: float
  scale: float  # pixels per face unit at the output size
  center: tuple[float, float]
  light: tuple[float, float]
  brightness: float
  jpeg_quality: int


@dataclasses.dataclass(frozen=True)
class Frame:
  """Per-frame state: pose (jittered around the scene's), expression, blink and gaze."""

  yaw: float
  pitch: float
  roll: float
  scale: float
  center: tuple[float, float]
  mouth_open: float
  smile: float
  blink: float
  gaze: tuple[float, float]


def sample_identity(rng: np.random.Generator) -> Identity:
  """Draws one identity's traits."""
  skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.05, 3)
  return Identity(
    skin=np.clip(skin, 0, 255),
    hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.8, 1.2),
    iris=IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] * rng.uniform(0.8, 1.2),
    lips=np.clip(skin * np.array([0.85, 0.55, 0.55]) + rng.uniform(-10, 10, 3), 0, 255),
    clothes=rng.uniform(20, 235, 3),
    face_w=rng.uniform(0.85, 1.0),
    chin_y=rng.uniform(1.3, 1.55),
    chin_power=rng.uniform(0.6, 1.1),
    head_top=rng.uniform(1.05, 1.25),
    hairline=rng.uniform(0.55, 0.8),
    hair_style=int(rng.choice(3, p=[0.5, 0.4, 0.1])),
    eye_x=rng.uniform(0.36, 0.44),
    eye_w=rng.uniform(0.15, 0.2),
    eye_h=rng.uniform(0.06, 0.09),
    brow_y=rng.uniform(0.17, 0.25),
    brow_t=rng.uniform(0.04, 0.08),
    nose_y=rng.uniform(0.5, 0.65),
    nose_w=rng.uniform(0.13, 0.19),
    mouth_y=rng.uniform(0.88, 1.02),
    mouth_w=rng.uniform(0.25, 0.34),
    lip_t=rng.uniform(0.05, 0.08),
    moles=rng.uniform([-0.7, -0.5], [0.7, 1.0], (int(rng.integers(0, 4)), 2)),
    grain=rng.uniform(0.03, 0.05),
    grain_seed=int(rng.integers(2**31)),
  )


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Low-frequency colour noise, a few flat shapes and fine grain: a room-like texture."""
  base = rng.uniform(30, 220, (4, 4, 3)).astype(np.float32)
  img = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
  for _ in range(int(rng.integers(2, 6))):
    colour = rng.uniform(20, 235, 3).tolist()
    x0, y0 = rng.integers(0, size, 2)
    x1, y1 = np.array([x0, y0]) + rng.integers(size // 8, size // 2, 2)
    if rng.random() < 0.5:
      cv2.rectangle(img, (int(x0), int(y0)), (int(x1), int(y1)), colour, -1)
    else:
      cv2.circle(img, (int(x0), int(y0)), int(rng.integers(size // 16, size // 4)), colour, -1)
  img += cv2.GaussianBlur(rng.normal(0, 12, (size, size, 3)).astype(np.float32), (0, 0), 1.0)
  return np.clip(img, 0, 255).astype(np.uint8)


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
  """Draws one video's scene (placement so the face fills about half the crop, as preprocess)."""
  return Scene(
    background=_background(rng, size),
    yaw=rng.uniform(-0.35, 0.35),
    pitch=rng.uniform(-0.2, 0.2),
    roll=rng.uniform(-0.2, 0.2),
    scale=size * rng.uniform(0.27, 0.32),
    center=tuple(size * (0.5 + rng.uniform(-0.04, 0.04, 2)) - np.array([0, 0.14 * size])),
    light=tuple(rng.normal(0, 1, 2) / 2),
    brightness=rng.uniform(0.8, 1.15),
    jpeg_quality=int(rng.integers(70, 96)),
  )


def sample_frame(rng: np.random.Generator, scene: Scene) -> Frame:
  """One frame of a video: small jitter around the scene's pose, talking mouth, blinks."""
  return Frame(
    yaw=scene.yaw + rng.normal(0, 0.04),
    pitch=scene.pitch + rng.normal(0, 0.03),
    roll=scene.roll + rng.normal(0, 0.03),
    scale=scene.scale * rng.uniform(0.97, 1.03),
    center=tuple(np.asarray(scene.center) + rng.normal(0, 0.01 * scene.scale * 4, 2)),
    mouth_open=float(max(0.0, rng.normal(0.02, 0.03))),
    smile=rng.uniform(-0.02, 0.05),
    blink=1.0 if rng.random() > 0.12 else 0.15,
    gaze=tuple(rng.uniform(-0.3, 0.3, 2)),
  )


def skin_grain(seed: int, side: int) -> np.ndarray:
  """Unit-variance noise with a correlation length of about one output pixel (canvas `side`).

  Skin texture: flat cartoon skin gives a resampled or sharpened region nothing to show, so
  SBI's resolution and sharpness mismatch (and a face swap's resolution drop) would leave no
  trace in the image; a fine grain makes them visible, as pores and stubble do in real faces.
  """
  noise = np.random.default_rng(seed).standard_normal((side, side), np.float32)
  noise = cv2.GaussianBlur(noise, (0, 0), 0.75 * SS)
  return noise / noise.std()


def face_model(ident: Identity, frame: Frame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """3-D model points [68, 3] in dlib order, plus the extra contours used for drawing."""
  a, b = ident.face_w, ident.chin_y
  t = np.linspace(0, np.pi, 17)
  jaw = np.stack(
    [-a * np.cos(t), 0.05 + (b - 0.05) * np.sin(t) ** ident.chin_power, 0.7 * np.sin(t) - 0.5], 1
  )
  ex, ew, eh = ident.eye_x, ident.eye_w, ident.eye_h * frame.blink
  by = -ident.brow_y - eh / 2
  s = np.linspace(0, 1, 5)
  brow_l = np.stack(
    [
      -(ex + ew + 0.06) + s * (2 * ew + 0.02),
      by - 0.07 * np.sin(np.pi * (0.3 + 0.6 * s)),
      np.full(5, 0.3),
    ],
    1,
  )
  brow_r = brow_l[::-1] * np.array([-1, 1, 1])
  ny = ident.nose_y
  bridge = np.stack([np.zeros(4), np.linspace(-0.02, ny - 0.06, 4), np.linspace(0.4, 0.75, 4)], 1)
  nw = ident.nose_w
  nostrils = np.stack(
    [np.linspace(-nw, nw, 5), ny + np.array([0, 0.03, 0.05, 0.03, 0]), np.full(5, 0.55)], 1
  )

  # Both eyes start at their image-left corner (outer for 36-41, inner for 42-47), upper lid first.
  eye = np.array(
    [
      [-ew, 0, 0],
      [-ew / 3, -eh, 0],
      [ew / 3, -eh, 0],
      [ew, 0, 0],
      [ew / 3, 0.8 * eh, 0],
      [-ew / 3, 0.8 * eh, 0],
    ]
  )
  eye_l, eye_r = (eye + np.array([cx, 0, 0.3]) for cx in (-ex, ex))
  my, mw, lt = ident.mouth_y, ident.mouth_w, ident.lip_t
  o, sm = frame.mouth_open, frame.smile
  u = np.array([1.0, 0.6, 0.25, 0.0, -0.25, -0.6, -1.0])
  upper = np.stack([mw * u[::-1], my - lt * np.array([0, 0.8, 1, 0.85, 1, 0.8, 0]), np.zeros(7)], 1)
  upper[[0, 6], 1] -= sm
  lower = np.stack(
    [
      mw * np.array([0.6, 0.25, 0, -0.25, -0.6]),
      my + o + lt * np.array([0.8, 1, 1.05, 1, 0.8]),
      np.zeros(5),
    ],
    1,
  )
  iu = np.array([-0.85, -0.35, 0, 0.35, 0.85])
  inner_up = np.stack([mw * iu, np.full(5, my - o / 2), np.zeros(5)], 1)
  inner_up[[0, 4], 1] = my - sm
  inner_lo = np.stack([mw * np.array([0.35, 0, -0.35]), np.full(3, my + o / 2), np.zeros(3)], 1)
  mouth = np.concatenate([upper, lower, inner_up, inner_lo])
  mouth[:, 2] = 0.45 - 0.4 * np.abs(mouth[:, 0])  # the mouth wraps around the face
  pts = np.concatenate([jaw, brow_l, brow_r, bridge, nostrils, eye_l, eye_r, mouth])
  tt = np.linspace(0, np.pi, 15)
  top = np.stack(
    [a * np.cos(tt), 0.05 - (0.05 + ident.head_top) * np.sin(tt), -0.5 + 0.6 * np.sin(tt)], 1
  )
  hair_out = top * np.array([1.08, 1.1, 1]) + np.array([0, -0.02, 0])
  hl = np.stack(
    [
      -a * np.cos(tt) * 0.98,
      -0.35 - (ident.hairline - 0.35) * np.sin(tt) ** 0.5,
      0.4 * np.sin(tt) - 0.3,
    ],
    1,
  )
  extra = {
    "head": top,
    "hair_out": hair_out,
    "hairline": hl,
    "moles": np.concatenate([ident.moles, np.full((len(ident.moles), 1), 0.3)], 1),
    "neck": np.array([[-0.5, 0.6, -0.6], [0.5, 0.6, -0.6], [0.55, 2.2, -0.6], [-0.55, 2.2, -0.6]]),
    "body": np.array([[-0.6, 1.9, -0.7], [0.6, 1.9, -0.7], [2.6, 3.5, -0.7], [-2.6, 3.5, -0.7]]),
    "long_hair": np.array(
      [
        [-a - 0.15, -0.3, -0.8],
        [a + 0.15, -0.3, -0.8],
        [a + 0.35, 1.9, -0.8],
        [-a - 0.35, 1.9, -0.8],
      ]
    ),
    "ears": np.array([[-a - 0.02, 0.25, -0.5], [a + 0.02, 0.25, -0.5]]),
  }
  return pts, extra


def project(points: np.ndarray, frame: Frame) -> np.ndarray:
  """Orthographic projection after yaw, pitch and roll; [N, 3] face units -> [N, 2] pixels."""
  cy, sy = np.cos(frame.yaw), np.sin(frame.yaw)
  cp, sp = np.cos(frame.pitch), np.sin(frame.pitch)
  x, y, z = points.T
  x, z = x * cy + z * sy, -x * sy + z * cy
  y = y * cp - z * sp
  cr, sr = np.cos(frame.roll), np.sin(frame.roll)
  x, y = x * cr - y * sr, x * sr + y * cr
  return np.stack([x, y], 1) * frame.scale + np.asarray(frame.center)


def _fix(p: np.ndarray) -> np.ndarray:
  """Output-pixel coordinates -> fixed-point canvas coordinates (shift 4) for OpenCV drawing."""
  return np.round(((p + 0.5) * SS - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)


def _poly(img, p, colour, closed=True, thickness=None):
  colour = [float(c) for c in colour]
  if thickness is None:
    cv2.fillPoly(img, [_fix(p)], colour, cv2.LINE_AA, 4)
  else:
    cv2.polylines(img, [_fix(p)], closed, colour, max(1, int(thickness * SS)), cv2.LINE_AA, 4)


def _ellipse(img, centre, axes, angle, colour):
  c = tuple(int(v) for v in _fix(np.asarray(centre)).ravel())
  ax = tuple(max(1, int(v * SS * 16)) for v in axes)
  cv2.ellipse(img, c, ax, float(angle), 0, 360, [float(v) for v in colour], -1, cv2.LINE_AA, 4)


def _roi(canvas: np.ndarray, outline: np.ndarray, pad: int) -> tuple[slice, slice, np.ndarray]:
  """Canvas rows/cols around a polygon given in output pixels, and the output-pixel offset of the
  window (subtract it from points to draw into the window)."""
  h, w = canvas.shape[:2]
  c = (outline + 0.5) * SS - 0.5
  x0, y0 = np.clip(np.floor(c.min(0)).astype(int) - pad, 0, [w, h])
  x1, y1 = np.clip(np.ceil(c.max(0)).astype(int) + pad + 1, 0, [w, h])
  return slice(y0, y1), slice(x0, x1), np.array([x0, y0]) / SS


def _clip_paint(canvas: np.ndarray, outline: np.ndarray, paint) -> None:
  """Composites `paint(layer, offset)` onto the canvas inside `outline` only (anti-aliased edge)."""
  ys, xs, off = _roi(canvas, outline, 2)
  window = canvas[ys, xs]
  inside = np.zeros(window.shape[:2], np.float32)
  _poly(inside, outline - off, [1.0])
  layer = window.copy()
  paint(layer, off)
  canvas[ys, xs] = window + (layer - window) * inside[..., None]


def draw_face(
  ident: Identity, scene: Scene, frame: Frame, size: int, *, background: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Renders one clean frame: (image uint8 [S, S, 3], landmarks float32 [68, 2]).

  The landmarks are the projected model points that the drawing itself uses.
  """
  pts3, extra = face_model(ident, frame)
  lm = project(pts3, frame)
  ex = {k: project(v, frame) for k, v in extra.items()}
  big = size * SS
  if background:
    canvas = cv2.resize(scene.background, (big, big), interpolation=cv2.INTER_LINEAR)
    canvas = canvas.astype(np.float32)
  else:
    canvas = np.full((big, big, 3), 128, np.float32)
  skin, u = ident.skin, frame.scale  # u: output pixels per face unit
  if ident.hair_style == 1:
    _poly(canvas, ex["long_hair"], ident.hair * 0.85)
  _poly(canvas, ex["body"], ident.clothes)
  _poly(canvas, ex["neck"], skin * 0.8)
  for centre in ex["ears"]:
    _ellipse(canvas, centre, (0.12 * u, 0.22 * u), np.degrees(frame.roll), skin * 0.88)
  # Skin with directional light and darker edges (ambient occlusion from the blurred outline).
  outline = np.concatenate([lm[0:17], ex["head"][1:-1]])
  lx, ly = scene.light
  ys, xs, off = _roi(canvas, outline, 2)
  face = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.float32)
  _poly(face, outline - off, [1.0])
  yy, xx = np.mgrid[ys, xs].astype(np.float32)
  cx, cy = (np.asarray(frame.center) + 0.5) * SS - 0.5
  light = 1 + 0.05 * ((xx - cx) * lx + (yy - cy) * ly) / (u * SS)
  rim = cv2.GaussianBlur(face, (0, 0), 0.18 * u * SS, borderType=cv2.BORDER_CONSTANT)
  shade = (0.95 + 0.05 * np.clip(rim * 1.6, 0, 1)) * light
  shade *= 1 + ident.grain * skin_grain(ident.grain_seed, big)[ys, xs]
  window = canvas[ys, xs]
  canvas[ys, xs] = window + (skin * shade[..., None] - window) * face[..., None]
  for m in ex["moles"]:
    _ellipse(canvas, m, (0.025 * u, 0.025 * u), 0, skin * 0.5)
  if ident.hair_style != 2:
    _poly(canvas, np.concatenate([ex["hair_out"], ex["hairline"]]), ident.hair)
  t = ident.brow_t * u
  for brow in (lm[17:22], lm[22:27]):
    _poly(canvas, np.concatenate([brow + [0, -t / 2], brow[::-1] + [0, t / 2]]), ident.hair * 0.8)
  # Eyes: sclera, iris and pupil clipped to the eye polygon, then the lids.
  r = ident.eye_h * u * 1.05
  gaze = np.asarray(frame.gaze) * [ident.eye_w * u * 0.4, ident.eye_h * u * 0.3]
  for eye in (lm[36:42], lm[42:48]):

    def paint_eye(layer, off, eye=eye):
      c = eye.mean(0) + gaze - off
      _poly(layer, eye - off, (235, 232, 226))
      _ellipse(layer, c, (r, r), 0, ident.iris)
      _ellipse(layer, c, (r * 0.45, r * 0.45), 0, (15, 12, 12))
      _ellipse(layer, c - r * 0.3, (r * 0.18, r * 0.18), 0, (250, 250, 250))

    _clip_paint(canvas, eye, paint_eye)
    _poly(canvas, eye[[0, 1, 2, 3]], (40, 30, 30), closed=False, thickness=0.035 * u)
    _poly(canvas, eye[[3, 4, 5, 0]], skin * 0.6, closed=False, thickness=0.015 * u)
  # Nose: bridge shadow on the side away from the light, wings, nostrils, tip highlight.
  side = -np.sign(lx) if lx else 1.0
  _poly(canvas, lm[27:31] + [side * 0.06 * u, 0], skin * 0.82, closed=False, thickness=0.03 * u)
  _poly(canvas, lm[31:36], skin * 0.7, closed=False, thickness=0.025 * u)
  for k in (32, 34):
    nostril = (0.035 * u, 0.02 * u)
    _ellipse(canvas, lm[k] + [0, -0.01 * u], nostril, np.degrees(frame.roll), (60, 35, 30))
  _ellipse(canvas, lm[30], (0.05 * u, 0.04 * u), 0, np.minimum(skin * 1.08, 255))
  # Mouth: lips, dark inside, teeth when open.
  _poly(canvas, lm[48:60], ident.lips)
  inner = lm[60:68]
  if frame.mouth_open > 0.01:

    def paint_mouth(layer, off):
      _poly(layer, inner - off, (70, 20, 25))
      teeth = np.concatenate([inner[0:5], inner[0:5][::-1] + [0, 0.45 * frame.mouth_open * u]])
      _poly(layer, teeth - off, (235, 230, 215))

    _clip_paint(canvas, inner, paint_mouth)
  _poly(canvas, inner[0:5], ident.lips * 0.55, closed=False, thickness=0.02 * u)
  image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA) * scene.brightness
  return np.clip(image + 0.5, 0, 255).astype(np.uint8), lm.astype(np.float32)


def camera(image: np.ndarray, rng: np.random.Generator, quality: int) -> np.ndarray:
  """Sensor noise then a JPEG pass (video compression); applied to reals and fakes alike."""
  noisy = image.astype(np.float32) + 2.0 * rng.standard_normal(image.shape, np.float32)
  noisy = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
  ok, buf = cv2.imencode(".jpg", noisy[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def _soft_hull(points: np.ndarray, size: int, shrink: float, blur: float) -> np.ndarray:
  c = points.mean(0)
  mask = np.zeros((size, size), np.float32)
  hull = cv2.convexHull(((points - c) * shrink + c).astype(np.float32)).reshape(-1, 2)
  cv2.fillPoly(mask, [np.round(hull * 16).astype(np.int32)], 1.0, cv2.LINE_AA, 4)
  k = 2 * int(3 * blur) + 1
  return cv2.GaussianBlur(mask, (k, k), blur) if blur > 0 else mask


def _fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity (rotation, uniform scale, shift) taking src points onto dst, 2x3."""
  ms, md = src.mean(0), dst.mean(0)
  s, d = src - ms, dst - md
  norm = (s * s).sum()
  a = (s * d).sum() / norm
  b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
  rot = np.array([[a, -b], [b, a]])
  return np.concatenate([rot, (md - rot @ ms)[:, None]], 1)


def swap_frame(
  img_t: np.ndarray,
  lm_t: np.ndarray,
  source: Identity,
  scene: Scene,
  frame: Frame,
  size: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Face-swap-like fake of the clean target frame (img_t, lm_t): (image, landmarks, mask uint8)."""
  img_s, lm_s = draw_face(source, scene, frame, size, background=False)
  m = _fit_similarity(lm_s[17:68], lm_t[17:68])
  warped = cv2.warpAffine(
    img_s, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
  )
  lm_w = lm_s @ m[:, :2].T + m[:, 2]
  factor = rng.uniform(1.6, 3.0)  # the autoencoder's lower output resolution
  small = cv2.resize(warped, (int(size / factor), int(size / factor)), interpolation=cv2.INTER_AREA)
  warped = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
  hull_pts = np.concatenate([lm_t[2:15], lm_t[17:27] + [0, -0.04 * frame.scale]])
  mask = _soft_hull(hull_pts, size, rng.uniform(0.9, 1.0), rng.uniform(0.03, 0.07) * frame.scale)
  inside = mask > 0.5
  shift = img_t[inside].mean(0) - warped[inside].mean(0)
  warped += shift * rng.uniform(0.3, 0.85)  # colour correction left incomplete
  out = mask[..., None] * warped + (1 - mask[..., None]) * img_t
  lm = np.concatenate([lm_t[:17], lm_w[17:]]).astype(np.float32)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8), lm, (mask * 255 + 0.5).astype(np.uint8)


def fingerprint_period(size: int) -> int:
  """Period (px) of the "gan" fingerprint in a `size` px store: 4 px per 64 px of store, but
  never a multiple of 8 (JPEG's block size, whose blocking artefacts every image carries).

  At the demo's 64 px input that is 4 px (3 px from a 128 px store): a frequency JPEG at
  quality 70-95 keeps and above the skin grain's band, below the Nyquist limit. The period
  scales with the store because a fixed small one would not survive the shrink to the input:
  a 2 px checkerboard averages to nothing in a 2x area shrink.
  """
  period = max(4, round(4 * size / 64))
  return period - 2 if period % 8 == 0 else period


def fingerprint(size: int, phase: tuple[float, float], amplitude: float) -> np.ndarray:
  """The "gan" generator's upsampling trace: a grid of soft dots, `amplitude` grey levels,
  period `fingerprint_period(size)` in x and y, float32 [size, size].

  One cosine per axis, so all its energy sits at the four frequencies (+-1/P, +-1/P); in JPEG's
  8x8 blocks that is the low-to-middle coefficients that quality 70-95 keeps.
  """
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  w = 2 * np.pi / fingerprint_period(size)
  return amplitude * np.cos(w * (xx + phase[0])) * np.cos(w * (yy + phase[1]))


def gan_frame(
  img_t: np.ndarray,
  lm_t: np.ndarray,
  target: Identity,
  scene: Scene,
  frame: Frame,
  size: int,
  rng: np.random.Generator,
  phase: tuple[float, float],
  fingerprint_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """GAN-rendered reenactment of the clean target frame (image, landmarks, mask uint8): the
  target's own face re-rendered at full resolution with another expression, carrying the
  generator's periodic fingerprint, pasted through a wide, very soft mask.

  Same identity, same light, same resolution: the blend leaves no colour, sharpness or identity
  seam (outside the mask the frame is untouched), so the fingerprint is the only trace.
  """
  expr = dataclasses.replace(
    frame,
    mouth_open=float(max(0.0, frame.mouth_open + rng.uniform(0.02, 0.08))),
    smile=frame.smile + rng.uniform(-0.03, 0.05),
    blink=1.0,  # the generator renders open eyes
    gaze=tuple(rng.uniform(-0.3, 0.3, 2)),
  )
  img_e, lm_e = draw_face(target, scene, expr, size)
  # phase: fixed per video (the generator's grid relative to the aligned face)
  amplitude = fingerprint_scale * rng.uniform(8.0, 12.0)
  gen = img_e.astype(np.float32) + fingerprint(size, phase, amplitude)[..., None]
  hull_pts = np.concatenate([lm_t[0:17], lm_t[17:27] + [0, -0.5 * frame.scale]])
  mask = _soft_hull(hull_pts, size, 0.92, 0.12 * frame.scale)
  mask = np.clip((mask - 0.02) / 0.98, 0, 1)  # exactly 0 far outside: the frame stays as it was
  out = mask[..., None] * gen + (1 - mask[..., None]) * img_t
  lm = np.concatenate([lm_t[:17], lm_e[17:]]).astype(np.float32)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8), lm, (mask * 255 + 0.5).astype(np.uint8)


def reenact_frame(
  img_t: np.ndarray,
  lm_t: np.ndarray,
  target: Identity,
  scene: Scene,
  frame: Frame,
  size: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reenactment-like fake of the clean target frame: the mouth region from another expression,
  generated at low resolution and upsampled with a checkerboard (image, landmarks, mask uint8)."""
  expr = dataclasses.replace(
    frame, mouth_open=rng.uniform(0.06, 0.14), smile=rng.uniform(-0.03, 0.08)
  )
  img_e, lm_e = draw_face(target, scene, expr, size)
  q = 4
  small = cv2.resize(img_e, (size // q, size // q), interpolation=cv2.INTER_AREA)
  up = cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST).astype(np.float32)
  up = cv2.GaussianBlur(up, (3, 3), 0.8)
  yy, xx = np.mgrid[0:size, 0:size]
  checker = np.where((xx + yy) % 2 == 0, 1.0, -1.0)[..., None] * rng.uniform(4, 9)
  up = up + checker + rng.uniform(-8, 8, 3)
  centre = lm_e[48:68].mean(0)
  axes = (np.ptp(lm_e[48:68, 0]) * 0.8, (lm_e[8, 1] - lm_e[33, 1]) * 0.55)
  mask = np.zeros((size, size), np.float32)
  c = tuple(int(v) for v in np.round(centre * 16))
  cv2.ellipse(
    mask,
    c,
    tuple(int(v * 16) for v in axes),
    np.degrees(frame.roll),
    0,
    360,
    1.0,
    -1,
    cv2.LINE_AA,
    4,
  )
  mask = cv2.GaussianBlur(mask, (3, 3), 0.7)
  out = mask[..., None] * up + (1 - mask[..., None]) * img_t
  lm = np.concatenate([lm_t[:48], lm_e[48:68]]).astype(np.float32)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8), lm, (mask * 255 + 0.5).astype(np.uint8)


def _derangement(ids: list[int], rng: np.random.Generator) -> dict[int, int]:
  """source identity for each target: a random cycle, so nobody is swapped with itself."""
  order = [ids[j] for j in rng.permutation(len(ids))]
  return {order[j]: order[(j + 1) % len(order)] for j in range(len(order))}


def make_demo_store(
  store_dir: str | Path,
  *,
  seed: int = 0,
  size: int = 64,
  train: int = 40,
  val: int = 8,
  test: int = 16,
  unseen: int = 16,
  frames: int = 4,
  families: tuple[str, ...] = DEFAULT_FAMILIES,
  grain_scale: float = 1.0,
  fingerprint_scale: float = 1.0,
  overwrite: bool = False,
) -> Path:
  """Writes the procedural demo face store and returns its path.

  `train`/`val`/`test` are real videos (identities) per split of dataset "demo", each with one
  fake per family of `families` (default: "gan"); `unseen` real videos of dataset "demo_unseen"
  (test split), each with one "swap" fake; every video has `frames` frames of `size` px. Other
  families ("swap", "reenact", see the module docstring) serve runs that need several
  manipulation streams, e.g. ``--config.data.streams=swap,reenact,sbi``; with "swap" among
  them, "demo_unseen" is no longer unseen. The store summary records the arguments and the
  data `DESIGN`. `grain_scale` multiplies every identity's skin grain and `fingerprint_scale`
  the "gan" fingerprint's amplitude (1: the design above; config.data.demo_grain and
  demo_fingerprint). Defaults: 640 crops of 64 px, about 10 s on one core. A store already built
  with the same arguments is returned as is; another non-empty directory is an error unless
  `overwrite`.
  """
  params = dict(seed=seed, size=size, train=train, val=val, test=test, unseen=unseen, frames=frames)
  params["design"] = DESIGN
  if tuple(families) != DEFAULT_FAMILIES:
    unknown = sorted(set(families) - set(FAMILY_DOMAIN))
    if unknown or not families or len(set(families)) != len(families):
      raise ValueError(f"families={families!r}: distinct names from {sorted(FAMILY_DOMAIN)}")
    params["families"] = list(families)
  for name, value in (("grain_scale", grain_scale), ("fingerprint_scale", fingerprint_scale)):
    if not value > 0:
      raise ValueError(f"{name}={value!r}: a positive factor (1: the default design)")
    if value != 1.0:
      params[name] = float(value)
  families_of = {"demo": tuple(families), "demo_unseen": ("swap",)}
  for name in ("train", "val", "test", "unseen"):
    if params[name] == 1 or params[name] < 0:
      raise ValueError(
        f"{name}={params[name]}: need 0 or at least 2 identities (fakes swap between them)"
      )
  if frames < 1 or size < 32:
    raise ValueError(f"need frames >= 1 and size >= 32, got frames={frames}, size={size}")
  store = Path(store_dir)
  summary_path = store / store_lib.SUMMARY
  if summary_path.is_file() and not overwrite:
    if json.loads(summary_path.read_text()).get("demo") == params:
      return store
  if store.exists() and any(store.iterdir()):
    if not overwrite:
      raise FileExistsError(
        f"{store} is not empty and is not a demo store built with {params}: remove it, pick "
        "another directory, or pass overwrite=True"
      )
    shutil.rmtree(store)
  writer = store_lib.StoreWriter(store)
  total = train + val + test + unseen
  identities = [sample_identity(np.random.default_rng([seed, 0, i])) for i in range(total)]
  if grain_scale != 1.0:
    identities = [dataclasses.replace(i, grain=i.grain * grain_scale) for i in identities]
  plan, start = [], 0
  for dataset, split, n in (
    ("demo", "train", train),
    ("demo", "val", val),
    ("demo", "test", test),
    ("demo_unseen", "test", unseen),
  ):
    ids = list(range(start, start + n))
    start += n
    sources = _derangement(ids, np.random.default_rng([seed, 1, start])) if ids else {}
    plan += [(dataset, split, i, sources[i]) for i in ids]
  for dataset, split, i, src in plan:
    scene = sample_scene(np.random.default_rng([seed, 2, i]), size)
    shots = [sample_frame(np.random.default_rng([seed, 3, i, f]), scene) for f in range(frames)]
    fams = families_of[dataset]
    reals, fakes = [], {family: [] for family in fams}
    phase = tuple(np.random.default_rng([seed, 9, i]).uniform(0, fingerprint_period(size), 2))
    for f, frame in enumerate(shots):
      image, lm = draw_face(identities[i], scene, frame, size)
      cam = np.random.default_rng([seed, 4, i, f])
      reals.append(store_lib.FaceCrop(camera(image, cam, scene.jpeg_quality), f, 0, lm))
      for k, family in enumerate(fams):
        rng = np.random.default_rng([seed, 5, k, i, f])
        if family == "swap":
          fake, lm_f, mask = swap_frame(image, lm, identities[src], scene, frame, size, rng)
        elif family == "gan":
          fake, lm_f, mask = gan_frame(
            image, lm, identities[i], scene, frame, size, rng, phase, fingerprint_scale
          )
        else:
          fake, lm_f, mask = reenact_frame(image, lm, identities[i], scene, frame, size, rng)
        cam = np.random.default_rng([seed, 6, k, i, f])
        crop = store_lib.FaceCrop(camera(fake, cam, scene.jpeg_quality), f, 0, lm_f, mask)
        fakes[family].append(crop)
    common = dict(dataset=dataset, split=split, frames_sampled=frames, frames_read=frames)
    writer.save_media(media_id=f"id{i:03d}", label=0, domain="real", crops=reals, **common)
    for family, crops in fakes.items():
      fake_id = f"id{i:03d}_id{src:03d}" if family == "swap" else f"id{i:03d}_{family}"
      writer.save_media(media_id=fake_id, label=1, domain=FAMILY_DOMAIN[family], crops=crops,
                        **common)  # fmt: skip
  writer.finish(extra={"demo": params})
  return store


def main(argv: list[str] | None = None) -> None:
  """CLI: ``python -m csdfd_jax.data.demo --out DIR [--seed N] [--size PX] [--train N] ...``."""
  import argparse
  import inspect

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="face store directory to write")
  parser.add_argument("--overwrite", action="store_true")
  for name, param in inspect.signature(make_demo_store).parameters.items():
    if type(param.default) is int:
      parser.add_argument(f"--{name}", type=int, default=param.default)
  parser.add_argument(
    "--families", default=",".join(DEFAULT_FAMILIES), help="fake generators of dataset demo"
  )
  args = vars(parser.parse_args(argv))
  args["families"] = tuple(args["families"].split(","))
  out = make_demo_store(args.pop("out"), **args)
  print(json.dumps(json.loads((out / store_lib.SUMMARY).read_text())["per_split"], indent=2))
  print(f"demo face store: {out}")


if __name__ == "__main__":
  main()
