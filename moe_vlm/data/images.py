"""Image loading and the LLaVA-1.5 / MoE-LLaVA image transform, in numpy.

MoE-LLaVA trains with `image_aspect_ratio="pad"`: the image is first padded to a
square canvas filled with the processor's mean colour (`expand2square`, background
`int(mean * 255)` per channel, image centred), then the vision processor resizes it
to the tower's resolution (bicubic), rescales to [0, 1] and normalises. Padding with
the mean colour makes the padded area exactly zero after normalisation, so the
tower sees "nothing" there rather than black.

Output layout is NHWC float32 ([H, W, 3] per image), what `moe_vlm.models.vlm`
consumes as `pixel_values`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Union

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
