"""Image loading (PNG, real DICOM and NIfTI files shipped by pydicom / nibabel) and the CLIP / SAM preprocessing."""
import os

import numpy as np
import pytest
from PIL import Image

from medplib_jax.data.images import (
    CLIP_MEAN,
    CLIP_PAD,
    CLIP_STD,
    ImageError,
    clip_preprocess,
    load_dicom,
    load_image,
    load_mask,
    load_nifti,
    sam_preprocess,
)


@pytest.mark.parametrize('size', [(40, 64), (64, 40), (50, 50)])
def test_clip_preprocess_matches_hf_clip_image_processor(np_rng, size):
    """Our resize-longest-side + centred pad, then HF's CLIPImageProcessor configured like the reference on the
    padded image: equal to 1e-6."""
    from transformers import CLIPImageProcessor
    image = np_rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
    ours = clip_preprocess(image)
    h, w = size
    s = 336 / max(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    padded = np.empty((336, 336, 3), np.uint8)
    padded[:] = CLIP_PAD
    padded[(336 - nh) // 2:(336 - nh) // 2 + nh, (336 - nw) // 2:(336 - nw) // 2 + nw] = resized
    proc = CLIPImageProcessor(size={'shortest_edge': 336}, crop_size={'height': 336, 'width': 336},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    ref = proc(images=Image.fromarray(padded), return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
    assert ours.shape == (336, 336, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert CLIP_PAD == (122, 116, 104)


def test_sam_preprocess_centred_pad_and_size(np_rng):
    image = np_rng.integers(0, 256, size=(300, 484, 3), dtype=np.uint8)
    out, (h, w) = sam_preprocess(image)
    assert out.shape == (256, 256, 3) and (h, w) == (159, 256)
    top = (256 - 159) // 2
    assert np.all(out[:top] == 0) and np.all(out[top + 159:] == 0) and np.any(out[top:top + 159] != 0)


def test_png_and_masks(tmp_path, np_rng):
    arr = np_rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / 'a.png')
    np.testing.assert_array_equal(load_image(str(tmp_path / 'a.png')), arr)
    m = np.zeros((20, 30), np.uint8)
    m[2:5, 3:9] = 255
    Image.fromarray(m).save(tmp_path / 'm.png')
    mask = load_mask(str(tmp_path / 'm.png'), (20, 30))
    assert mask.dtype == np.uint8 and mask.sum() == 18 and mask.max() == 1
    with pytest.raises(ImageError, match=r'm\.png: mask is 30x20, the image is 40x20'):
        load_mask(str(tmp_path / 'm.png'), (20, 40))
    (tmp_path / 'trunc.png').write_bytes((tmp_path / 'a.png').read_bytes()[:60])
    with pytest.raises(ImageError, match=r'trunc\.png: cannot decode image'):
        load_image(str(tmp_path / 'trunc.png'))
    with pytest.raises(ImageError, match='image file not found'):
        load_image(str(tmp_path / 'missing.png'))


def test_real_dicom_ct_and_mr():
    import pydicom
    from pydicom.data import get_testdata_file
    ct = get_testdata_file('CT_small.dcm', download=False)
    rgb = load_dicom(ct)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    # CT has no window in the file: the abdomen preset (40, 400) on Hounsfield units
    hu = pydicom.dcmread(ct).pixel_array * 1.0 - 1024
    expected = np.round(np.clip((hu - (40 - 200)) / 400, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    mr = load_image(get_testdata_file('MR_small.dcm', download=False))  # window from the file (600 / ...)
    assert mr.shape == (64, 64, 3) and mr.std() > 0


def test_real_nifti_slice():
    from nibabel.testing import data_path
    path = os.path.join(data_path, 'anatomical.nii')
    rgb = load_nifti(path)
    assert rgb.shape == (41, 33, 3) and rgb.dtype == np.uint8 and rgb.std() > 0
    assert load_nifti(path, axis=0, index=3).shape == (25, 41, 3)  # (41, 25) slice, transposed
    with pytest.raises(ImageError, match='slice 99 outside 0..24 along axis 2'):
        load_nifti(path, index=99)


def _write_png(path, samples, color_type, bit_depth, palette=None, trns=None):
    """A PNG written here from its specification (signature, IHDR, optional PLTE / tRNS, one IDAT of filter-0
    scanlines, IEND), so 16-bit files do not depend on the decoder under test."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    h, w = samples.shape[:2]
    raw = samples.astype('>u2' if bit_depth == 16 else np.uint8).reshape(h, -1)
    rows = b''.join(b'\x00' + row.tobytes() for row in raw)
    out = b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += chunk(b'PLTE', palette.astype(np.uint8).tobytes())
    if trns is not None:
        out += chunk(b'tRNS', bytes(trns))
    out += chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b'')
    path.write_bytes(out)
    return str(path)


def test_pngs_decode_to_the_references_pixels(tmp_path, np_rng):
    """cv2.imread then BGR -> RGB (`LazySupervisedDataset.__getitem__`), computed here in NumPy: 16-bit samples >> 8
    (not clipped), grey replicated to three channels, alpha dropped, palettes expanded."""
    h, w = 7, 9
    grey16 = np_rng.integers(0, 65536, size=(h, w), dtype=np.uint16)
    grey16[0, :4] = [0, 255, 256, 65535]  # the edges of the >> 8 rule
    want = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(load_image(_write_png(tmp_path / 'g16.png', grey16, 0, 16)), want)
    # a CT-like slice (values in the low thousands): no longer almost all white
    ct = np_rng.integers(800, 1400, size=(h, w), dtype=np.uint16)
    got = load_image(_write_png(tmp_path / 'ct.png', ct, 0, 16))
    assert got.max() <= 1400 >> 8 and np.array_equal(got[..., 0], (ct >> 8).astype(np.uint8))

    rgb16 = np_rng.integers(0, 65536, size=(h, w, 3), dtype=np.uint16)
    np.testing.assert_array_equal(load_image(_write_png(tmp_path / 'rgb16.png', rgb16, 2, 16)),
                                  (rgb16 >> 8).astype(np.uint8))

    grey8 = np_rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(_write_png(tmp_path / 'g8.png', grey8, 0, 8)),
                                  np.repeat(grey8[..., None], 3, axis=-1))

    grey_alpha = np_rng.integers(0, 256, size=(h, w, 2), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(_write_png(tmp_path / 'ga.png', grey_alpha, 4, 8)),
                                  np.repeat(grey_alpha[..., :1], 3, axis=-1))

    rgba = np_rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(_write_png(tmp_path / 'rgba.png', rgba, 6, 8)), rgba[..., :3])

    palette = np_rng.integers(0, 256, size=(5, 3), dtype=np.uint8)
    index = np_rng.integers(0, 5, size=(h, w), dtype=np.uint8)
    path = _write_png(tmp_path / 'p.png', index, 3, 8, palette=palette, trns=[0, 128])  # transparency ignored
    np.testing.assert_array_equal(load_image(path), palette[index])
