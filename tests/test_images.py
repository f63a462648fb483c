"""Image loading (PNG, real DICOM and NIfTI files shipped by pydicom / nibabel) and the CLIP / SAM preprocessing."""
import os

import numpy as np
import pytest
from PIL import Image

from medplib_jax.data.images import (CLIP_MEAN, CLIP_PAD, CLIP_STD, ImageError, clip_preprocess, load_dicom,
                                     load_image, load_mask, load_nifti, sam_preprocess)


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
    from pydicom.data import get_testdata_file
    import pydicom
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
