"""Medical image loading (PNG/JPEG, DICOM, NIfTI -> RGB uint8) and the reference's CLIP / SAM-Med2D
preprocessing (`LazySupervisedDataset.__getitem__`). Images are HWC numpy arrays; errors name the file.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medplib_jax.constants import CLIP_SIZE, SAM_SIZE
from medplib_jax.data.regions import resized_size

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_PAD = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104), padding in uint8 before normalisation
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
# Display windows (centre, width) when a DICOM file carries none.
WINDOW_PRESETS = {'CT': (40.0, 400.0)}


class ImageError(ValueError):
    """An image or mask file that cannot be read or has the wrong shape."""


def find_image(path: str) -> str:
    """`path`, or `path + '.png'` when only that exists: some released MeCoVQA records name SA-Med2D images
    without the suffix."""
    if not os.path.isfile(path) and not os.path.splitext(path)[1] and os.path.isfile(path + '.png'):
        return path + '.png'
    return path


def image_kind(path: str) -> str:
    """'dicom' (.dcm), 'nifti' (.nii, .nii.gz) or 'image' (PNG / JPEG / anything Pillow reads), by the file name."""
    lower = path.lower()
    return 'dicom' if lower.endswith('.dcm') else 'nifti' if lower.endswith(('.nii', '.nii.gz')) else 'image'


def load_image(path: str, *, nifti_axis: int = 2, nifti_slice: int | None = None) -> np.ndarray:
    """Any supported file -> (H, W, 3) uint8 RGB."""
    if not os.path.isfile(path):
        raise ImageError(f'{path}: image file not found')
    kind = image_kind(path)
    if kind == 'dicom':
        return load_dicom(path)
    if kind == 'nifti':
        return load_nifti(path, axis=nifti_axis, index=nifti_slice)
    try:
        with Image.open(path) as im:
            return decode_like_cv2(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f'{path}: cannot decode image ({e})') from None


# PIL modes of one 16-bit (or wider integer) grey channel.
_WIDE_GREY = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def decode_like_cv2(im: Image.Image) -> np.ndarray:
    """A PNG / JPEG as the reference reads it (`cv2.imread(path)` then BGR -> RGB, LazySupervisedDataset
    `__getitem__`) -> (H, W, 3) uint8 RGB. OpenCV's default colour read scales 16-bit samples to 8 bits by
    `value >> 8` (PIL's `convert('RGB')` clips them at 255 instead: a 16-bit CT slice came out almost all white),
    replicates a grey channel to three, drops alpha, expands a palette, and applies a JPEG's EXIF orientation."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE_GREY:
        grey = (np.clip(np.asarray(im, np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode in ('L', 'LA', 'La', '1'):
        grey = np.asarray(im.convert('L'))  # '1' -> 0 / 255, as OpenCV expands 1-bit samples
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode in ('P', 'PA'):
        im = im.convert('RGBA')  # the palette expanded; its transparency is then dropped with the alpha
    # RGB (16-bit PNGs already keep the high byte of each sample), RGBA (alpha dropped), CMYK / YCbCr (converted).
    return np.asarray(im.convert('RGB'))


def _to_rgb_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.clip((values.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0, 1)
    gray = np.round(scaled * 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def load_dicom(path: str, window: tuple[float, float] | None = None) -> np.ndarray:
    """DICOM -> RGB uint8: rescale slope / intercept to modality units (HU for CT), then the window from the
    argument, the file (first value of WindowCenter / WindowWidth), the modality preset, or the 0.5-99.5
    percentile range, in that order. MONOCHROME1 is inverted; RGB data is returned as is."""
    import pydicom
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for broken files / missing codecs
        raise ImageError(f'{path}: cannot read DICOM pixel data ({type(e).__name__}: {e})') from None
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return pixels.astype(np.uint8)
    if pixels.ndim == 3:  # multi-frame: the middle frame
        pixels = pixels[pixels.shape[0] // 2]
    values = pixels * float(ds.get('RescaleSlope', 1) or 1) + float(ds.get('RescaleIntercept', 0) or 0)
    if window is None and 'WindowCenter' in ds and 'WindowWidth' in ds:
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)  # noqa: E731
        window = (first(ds.WindowCenter), first(ds.WindowWidth))
    if window is None:
        window = WINDOW_PRESETS.get(str(ds.get('Modality', '')))
    if window is None:
        lo, hi = np.percentile(values, [0.5, 99.5])
    else:
        centre, width = window
        lo, hi = centre - width / 2, centre + width / 2
    rgb = _to_rgb_uint8(values, lo, hi)
    return 255 - rgb if ds.get('PhotometricInterpretation') == 'MONOCHROME1' else rgb


def load_nifti(path: str, axis: int = 2, index: int | None = None) -> np.ndarray:
    """NIfTI volume -> one slice (the middle one by default) along `axis`, 0.5-99.5 percentile window, RGB uint8.
    The slice is transposed so the volume's second axis runs down the image rows."""
    import nibabel
    try:
        volume = np.asanyarray(nibabel.load(path).dataobj)
    except Exception as e:
        raise ImageError(f'{path}: cannot read NIfTI ({type(e).__name__}: {e})') from None
    if volume.ndim == 4:
        volume = volume[..., 0]
    if volume.ndim != 3 or not 0 <= axis < 3:
        raise ImageError(f'{path}: expected a 3-D volume and axis in 0..2, got shape {volume.shape}, axis {axis}')
    n = volume.shape[axis]
    index = n // 2 if index is None else index
    if not 0 <= index < n:
        raise ImageError(f'{path}: slice {index} outside 0..{n - 1} along axis {axis}')
    sl = np.take(volume, index, axis=axis).T
    lo, hi = np.percentile(sl, [0.5, 99.5])
    return _to_rgb_uint8(sl, lo, hi)


def load_mask(path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Mask PNG -> (H, W) uint8 in {0, 1} (value >= 1 is inside, as the reference); checks the image size."""
    if not os.path.isfile(path):
        raise ImageError(f'{path}: mask file not found')
    try:
        with Image.open(path) as im:
            mask = (np.asarray(im.convert('L')) >= 1).astype(np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f'{path}: cannot decode mask ({e})') from None
    if shape is not None and mask.shape != tuple(shape):
        raise ImageError(f'{path}: mask is {mask.shape[1]}x{mask.shape[0]}, the image is {shape[1]}x{shape[0]}')
    return mask


def resize_longest_side(image: np.ndarray, target: int) -> np.ndarray:
    """SAM's ResizeLongestSide.apply_image: PIL bilinear to (int(h*s + .5), int(w*s + .5))."""
    h, w = image.shape[:2]
    nh, nw = resized_size(h, w, target)
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))


def _centred(image: np.ndarray, size: int, fill: tuple[int, ...] | int) -> np.ndarray:
    h, w = image.shape[:2]
    canvas = np.empty((size, size) + image.shape[2:], image.dtype)
    canvas[:] = fill
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top:top + h, left:left + w] = image
    return canvas


def clip_canvas(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> (336, 336, 3) uint8: resize longest side, centred pad with the CLIP-mean colour."""
    return _centred(resize_longest_side(image, CLIP_SIZE), CLIP_SIZE, CLIP_PAD)


def clip_normalize(canvas: np.ndarray) -> np.ndarray:
    """CLIPImageProcessor's rescale and normalise (its shortest-edge resize and centre crop are no-ops at 336)."""
    return ((canvas.astype(np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).astype(np.float32)


def clip_preprocess(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> (336, 336, 3) float32, the reference's 'pad' branch (`LazySupervisedDataset.__getitem__`)."""
    return clip_normalize(clip_canvas(image))


def sam_canvas(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 -> ((256, 256, 3) uint8 resized to longest side 256 and centred on zeros, (h', w'))."""
    resized = resize_longest_side(image, SAM_SIZE)
    return _centred(resized, SAM_SIZE, 0), resized.shape[:2]


def sam_normalize(canvas: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Normalise on the 0-255 scale inside the centred (h', w') image; the padding is 0 *after* normalisation."""
    h, w = size
    top, left = (SAM_SIZE - h) // 2, (SAM_SIZE - w) // 2
    out = np.zeros((SAM_SIZE, SAM_SIZE, 3), np.float32)
    inner = canvas[top:top + h, left:left + w].astype(np.float32)
    out[top:top + h, left:left + w] = (inner - np.float32(SAM_MEAN)) / np.float32(SAM_STD)
    return out


def sam_preprocess(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 -> ((256, 256, 3) float32, (h', w')): resize longest side to 256, normalise on the 0-255 scale,
    centred zero pad (after normalisation; the original SAM pads bottom / right)."""
    canvas, size = sam_canvas(image)
    return sam_normalize(canvas, size), size
