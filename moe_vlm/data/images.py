"""Image loading and the LLaVA-1.5 / MoE-LLaVA image transform, in numpy.

MoE-LLaVA trains with `image_aspect_ratio="pad"`: the image is first padded to a
square canvas filled with the processor's mean colour (`expand2square`, background
`int(mean * 255)` per channel, image centred), then the vision processor resizes it
to the tower's resolution (bicubic), rescales to [0, 1] and normalises. Padding with
the mean colour makes the padded area exactly zero after normalisation, so the
tower sees "nothing" there rather than black.

Output layout is NHWC float32 ([H, W, 3] per image), what `moe_vlm.models.vlm`
consumes as `pixel_values`.

Qwen2-VL (native resolution, `qwen2_vl_patches`): no padding to a square; the image is
resized by `smart_resize` (sides multiples of patch x merge, area within [min_pixels,
max_pixels]) and cut into patches in transformers' layout, padded to a fixed budget.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Union

import numpy as np
from PIL import Image


class ImageError(ValueError):
  """Base class for a sample whose image cannot be used."""


class MissingImageError(ImageError, FileNotFoundError):
  """The record names an image file that does not exist."""


class UnreadableImageError(ImageError):
  """The image exists but cannot be decoded (corrupt, truncated, not an image)."""


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel mean/std of a vision tower's processor (RGB order, [0, 1] scale)."""

  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def background(self) -> tuple[int, int, int]:
    """The pad colour `expand2square` uses: int(mean * 255), truncated as in LLaVA."""
    return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]


# CLIPImageProcessor (openai/clip-vit-large-patch14-336) and SiglipImageProcessor
# (google/siglip-so400m-patch14-384) constants.
NORMALIZATIONS: dict[str, Normalization] = {
    "clip": Normalization(mean=(0.48145466, 0.4578275, 0.40821073),
                          std=(0.26862954, 0.26130258, 0.27577711)),
    "siglip": Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}

ImageInput = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


def get_normalization(name: str | Normalization) -> Normalization:
  """Looks a constant set up by name ("clip" or "siglip"); passes instances through."""
  if isinstance(name, Normalization):
    return name
  try:
    return NORMALIZATIONS[name]
  except KeyError:
    raise ValueError(f"unknown image normalization {name!r}; expected one of "
                     f"{sorted(NORMALIZATIONS)}") from None


def load_image(source: ImageInput) -> Image.Image:
  """Opens an image from a path, encoded bytes, an HWC uint8 array or a PIL image.

  Returns a fully decoded RGB image. Raises MissingImageError for a path that does not
  exist and UnreadableImageError for anything that does not decode, so callers can
  count the two failure kinds separately.
  """
  if isinstance(source, Image.Image):
    image = source
  elif isinstance(source, np.ndarray):
    if source.ndim == 2:
      source = source[..., None]
    if source.ndim != 3 or source.shape[-1] not in (1, 3, 4) or source.size == 0:
      raise UnreadableImageError(f"image array has shape {source.shape}; expected "
                                 "[H, W, C] with C in (1, 3, 4)")
    array = source.astype(np.uint8) if source.dtype != np.uint8 else source
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  elif isinstance(source, (bytes, bytearray, memoryview)):
    image = _decode(io.BytesIO(bytes(source)), "<encoded bytes>")
  elif isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise MissingImageError(f"image file not found: {path}")
    with open(path, "rb") as f:
      image = _decode(f, path)
  else:
    raise UnreadableImageError(f"cannot load an image from a {type(source).__name__}; "
                               "expected a path, encoded bytes, an array or a PIL image")
  return image if image.mode == "RGB" else image.convert("RGB")


def _decode(fileobj, name: str) -> Image.Image:
  # `Image.open` is lazy: `load()` forces the full decode so truncated files fail here,
  # inside the loader's error handling, not later in the transform.
  try:
    image = Image.open(fileobj)
    image.load()
    return image
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise UnreadableImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
  """Pads to a square canvas of colour `background`, image centred (LLaVA expand2square).

  The offset is `(long - short) // 2`, as in the reference, so odd differences put the
  extra row/column after the image.
  """
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), background)
  if width > height:
    canvas.paste(image, (0, (width - height) // 2))
  else:
    canvas.paste(image, ((height - width) // 2, 0))
  return canvas


def transform_image(image: Image.Image, *, image_size: int,
                    normalization: str | Normalization = "clip",
                    pad_to_square: bool = True) -> np.ndarray:
  """RGB PIL image -> normalised float32 [image_size, image_size, 3].

  pad_to_square=True is MoE-LLaVA's "pad" aspect; False squashes the image to a square
  (the processors' centre crop is a no-op after padding, so it is not modelled).
  """
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  norm = get_normalization(normalization)
  if image.mode != "RGB":
    image = image.convert("RGB")
  if pad_to_square:
    image = expand_to_square(image, norm.background)
  if image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  mean = np.asarray(norm.mean, np.float32)
  std = np.asarray(norm.std, np.float32)
  return (pixels - mean) / std


def load_and_transform(source: ImageInput, *, image_size: int,
                       normalization: str | Normalization = "clip",
                       pad_to_square: bool = True) -> np.ndarray:
  """`load_image` then `transform_image`: path/bytes/array -> float32 [H, W, 3]."""
  return transform_image(load_image(source), image_size=image_size,
                         normalization=normalization, pad_to_square=pad_to_square)


# ------------------------------------------------------- Qwen2-VL: native resolution


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """Qwen2-VL's target size (transformers' `smart_resize`): both sides multiples of
  `factor` (patch x merge), the area within [min_pixels, max_pixels] where it can be, the
  aspect ratio kept as closely as possible. Aspect ratios above 200 are refused."""
  if min(height, width) < 1:
    raise UnreadableImageError(f"image of {height} x {width} pixels")
  if max(height, width) / min(height, width) > 200:
    raise UnreadableImageError(f"image of {height} x {width} pixels: Qwen2-VL takes aspect "
                               "ratios up to 200")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class PatchConfig:
  """Qwen2-VL's image transform (`VisionConfig.variant="qwen2_vl"`): smart_resize to
  multiples of patch x merge within [min_pixels, max_pixels], bicubic, rescale and
  normalise, then patches of `temporal_patch_size` (the image repeated) x patch x patch,
  in merge-group order, padded to `max_patches` slots."""

  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280

  def __post_init__(self):
    if self.max_patches < self.merge_size ** 2 or self.min_pixels > self.max_pixels:
      raise ValueError(f"{self}: max_pixels must hold one merged patch (patch x merge)^2 "
                       "and min_pixels <= max_pixels")

  @classmethod
  def of(cls, vision: Any) -> "PatchConfig":
    """The transform of a `VisionConfig` (variant "qwen2_vl")."""
    return cls(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
               temporal_patch_size=vision.temporal_patch_size, min_pixels=vision.min_pixels,
               max_pixels=vision.max_pixels)

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @property
  def max_patches(self) -> int:
    group = self.merge_size ** 2
    return self.max_pixels // self.patch_size ** 2 // group * group

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size ** 2

  def target_size(self, height: int, width: int) -> tuple[int, int]:
    """smart_resize, then (only for aspect ratios so extreme that smart_resize's one-
    factor floor overshoots max_pixels) the long side cut until the patches fit the
    budget: every image gets at most `max_patches` patches."""
    h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
    budget = self.max_patches * self.patch_size ** 2
    while h * w > budget:
      if h >= w:
        h -= self.factor
      else:
        w -= self.factor
    return h, w

  def grid(self, height: int, width: int) -> tuple[int, int, int]:
    """The patch grid (t, h, w) of an image of height x width pixels."""
    h, w = self.target_size(height, width)
    return 1, h // self.patch_size, w // self.patch_size

  def num_tokens(self, height: int, width: int) -> int:
    """LLM tokens of such an image: its merged patches."""
    t, h, w = self.grid(height, width)
    return t * h * w // self.merge_size ** 2


def patchify(pixels: np.ndarray, cfg: PatchConfig) -> np.ndarray:
  """Normalised [H, W, C] -> [H/p * W/p, C * T * p * p] patches in merge-group order, each
  flattened as (channel, time, row, column) like transformers' Qwen2-VL processor (the
  image repeated over the T temporal slots)."""
  h, w, c = pixels.shape
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  gh, gw = h // p, w // p
  x = pixels.transpose(2, 0, 1).reshape(c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
  return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32)


def qwen2_vl_patches(image: Image.Image, cfg: PatchConfig,
                     normalization: str | Normalization = "clip"
                     ) -> tuple[np.ndarray, np.ndarray]:
  """RGB PIL image -> (patches float32 [max_patches, patch_dim], the first t*h*w real and
  the rest zero; grid int32 [3] = (t, h, w)). No pad-to-square: the native aspect ratio
  is the point. Qwen2-VL uses the CLIP mean/std."""
  norm = get_normalization(normalization)
  if image.mode != "RGB":
    image = image.convert("RGB")
  height, width = image.size[1], image.size[0]
  h, w = cfg.target_size(height, width)
  if (h, w) != (height, width):
    image = image.resize((w, h), Image.Resampling.BICUBIC)
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  pixels = (pixels - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
  real = patchify(pixels, cfg)
  out = np.zeros((cfg.max_patches, cfg.patch_dim), np.float32)
  out[:len(real)] = real
  return out, np.asarray((1, h // cfg.patch_size, w // cfg.patch_size), np.int32)


def image_size_of(source: ImageInput) -> tuple[int, int]:
  """(height, width) of an image, reading only its header when it is a file or bytes
  (how many tokens a Qwen2-VL image takes, without decoding it)."""
  if isinstance(source, Image.Image):
    return source.size[1], source.size[0]
  if isinstance(source, np.ndarray):
    return int(source.shape[0]), int(source.shape[1])
  if isinstance(source, (str, os.PathLike)) and not os.path.isfile(os.fspath(source)):
    raise MissingImageError(f"image file not found: {os.fspath(source)}")
  try:
    fileobj = (io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview))
               else open(os.fspath(source), "rb"))
    with fileobj, Image.open(fileobj) as image:
      return image.size[1], image.size[0]
  except (OSError, SyntaxError, ValueError) as e:
    raise UnreadableImageError(f"cannot read the image header: {type(e).__name__}: {e}") from e
