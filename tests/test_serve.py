"""`medplib-jax serve` in a real headless browser (Debian's chromium driven by playwright through tests/browser.py;
`.ci/run` installs it): the server runs as a user starts it (a subprocess on a free localhost port) on a tiny
randomly initialised MoE MedPLIB whose metadata marks it trained on the synthetic demo data. In the browser: an
upload, a box drawn with the mouse and a question get the answer (the mask's size in place of `<SEG>`), the mask
overlay, the routing picture and the region picture that `serve.respond` gives for the same request in this
process; the region panel previews Box, Point and Sketch while drawing, with a brush sized to the image; the DICOM
window and NIfTI slice controls reload the image; the demo notice and the demo's questions show; a user error is
one line in the server's log. Also, without a browser: the demo's stroke -> region rules, the upload resize, the
answer text, DICOM / NIfTI loading and the port check."""
import os
import socket
import time
import types

import jax
import numpy as np
import pytest
from PIL import Image
from support.browser import (
    PICTURES,
    ask,
    ask_page,
    browser_page,
    draw,
    info_text,
    picture_src,
    serving,
    upload_file,
    upload_image,
    wait_file_info,
    wait_picture,
)
from support.tiny_params import random_params_dir

from medplib_jax.constants import DEMO_NOTICE
from medplib_jax.data import synthetic
from medplib_jax.data.images import image_kind, load_dicom, load_nifti
from medplib_jax.infer.session import ChatError, build_predictor, with_region_slots
from medplib_jax.main.serve import (
    DEMO_TEMPERATURE,
    brush_radius,
    build_app,
    check_port,
    demo_questions,
    demo_resize,
    editor_arrays,
    file_info,
    image_info,
    load_upload,
    model_view,
    nifti_slices,
    region_picture,
    respond,
    shown_answer,
    stroke_region,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 4
QUESTION = 'Please segment the lesion in this region.'


def dicom_file() -> str:
    import pydicom.data
    return pydicom.data.get_testdata_file('CT_small.dcm', download=False)


def nifti_file() -> str:
    from nibabel.testing import data_path
    return os.path.join(data_path, 'anatomical.nii')  # 33 x 41 x 25


@pytest.fixture(scope='module')
def params_dir(tmp_path_factory):
    return random_params_dir(str(tmp_path_factory.mktemp('serve') / 'params'), synthetic=True)


@pytest.fixture(scope='module')
def server(params_dir, tmp_path_factory):
    """`medplib-jax serve` on a free port, `--mask_mode=always` so a random model's answer has a mask; yields
    its URL and log file once the page answers, stops it afterwards."""
    log = tmp_path_factory.mktemp('serve_log') / 'serve.log'
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp('gradio')))
    with serving(params_dir, str(log), f'--max_new_tokens={MAX_NEW}', '--mask_mode=always', env=env) as running:
        yield running.url, log


def filled_rectangle(changed: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of pixels that must form one filled rectangle covering part of the
    picture."""
    rows, cols = np.nonzero(changed)
    assert 10 < len(rows) < changed.size // 2, f'{len(rows)} of {changed.size} pixels changed: not a drawn region'
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    assert changed[r0:r1 + 1, c0:c1 + 1].all() and changed.sum() == (r1 - r0 + 1) * (c1 - c0 + 1), 'not a rectangle'
    return r0, r1, c0, c1


def region_on(picture: np.ndarray, resized: np.ndarray) -> np.ndarray:
    """The region a region picture shows on `resized` (the upload as the model receives it): the pixels it tinted;
    the picture must be exactly `serve.region_picture` of that region (so its background is `resized`)."""
    assert picture.shape == resized.shape
    region = (picture != resized).any(-1)
    np.testing.assert_array_equal(picture, np.asarray(region_picture(resized, region)))
    return region


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.browser
def test_page_answers_with_the_mask_size_and_the_pictures_respond_gives(server, params_dir, tmp_path, np_rng):
    url, log = server
    image = np_rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / 'scan.png')
    stroke = [(40, 30), (60, 40), (80, 50)]  # (x, y) of the upload: Box mode asks about its bounding rectangle
    got = ask_page(url, str(tmp_path / 'scan.png'), QUESTION, mode='Box', stroke=stroke)
    assert not got.errors, f'the page shows an error: {got.errors}\n{log.read_text()[-3000:]}'
    assert got.mask and set(got.pictures) == set(PICTURES)
    # The region: the stroke's bounding box, widened by the brush radius (2 pixels on a 120 x 160 upload), on the
    # upload resized to the demo's 336 shortest edge.
    resized = demo_resize(image, 336)
    r0, r1, c0, c1 = filled_rectangle(region_on(got.pictures['region'], resized))
    scale, radius = 336 / 120, brush_radius(image.shape)
    for drawn, want in ((r0, 30 - radius), (r1 + 1, 50 + radius + 1), (c0, 40 - radius), (c1 + 1, 80 + radius + 1)):
        assert abs(drawn / scale - want) <= 2, (drawn / scale, want)
    # The same request in this process: the page's first answered request samples with key 0.
    box = np.zeros(resized.shape[:2], bool)
    box[r0:r1 + 1, c0:c1 + 1] = True
    predictor = build_predictor(params_dir, max_new_tokens=MAX_NEW, temperature=DEMO_TEMPERATURE)
    want = respond(predictor, resized, box, 'Sketch', QUESTION, mask_mode='always', rng=jax.random.key(0))
    assert got.text == want.text and f'mask: {int(want.mask.sum())} px' in got.text
    for name in PICTURES:
        np.testing.assert_array_equal(got.pictures[name], np.asarray(getattr(want, name).convert('RGB')), name)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.browser
def test_region_panel_previews_box_point_and_sketch_while_drawing_with_a_brush_sized_to_the_image(server, tmp_path):
    url, _ = server
    yy, xx = np.mgrid[:600, :800]  # smooth (a small PNG); 600 px: brush radius 6
    image = np.stack([xx * 255 // 800, yy * 255 // 600, np.full_like(xx, 128)], -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / 'big.png')
    resized, scale, radius = demo_resize(image, 336), 336 / 600, brush_radius(image.shape)
    assert resized.shape == (336, 448, 3) and radius == 6
    with browser_page(url) as page:
        size = upload_image(page, str(tmp_path / 'big.png'))
        assert info_text(page, 'image_info') == image_info(image.shape)
        draw(page, 'Box', [(300, 300), (400, 300), (500, 300)], size)  # a horizontal stroke
        box = region_on(wait_picture(page, 'region'), resized)
        shown = picture_src(page, 'region')
        page.get_by_label('Point', exact=True).check()
        point = region_on(wait_picture(page, 'region', shown), resized)
        shown = picture_src(page, 'region')
        page.get_by_label('Sketch', exact=True).check()
        sketch = region_on(wait_picture(page, 'region', shown), resized)
        assert page.locator('#answer textarea').input_value() == '', 'nothing was asked'
    r0, r1, c0, c1 = filled_rectangle(box)
    for drawn, want in ((r0, 300 - radius), (r1 + 1, 300 + radius + 1), (c0, 300 - radius), (c1 + 1, 500 + radius + 1)):
        assert abs(drawn / scale - want) <= 2, (drawn / scale, want)
    r0, r1, c0, c1 = filled_rectangle(point)  # the 41 x 41 square around the stroke's median pixel
    assert abs((r1 - r0 + 1) / scale - 41) <= 2 and abs((c1 - c0 + 1) / scale - 41) <= 2
    assert abs((r0 + r1) / 2 / scale - 300) <= 2 and abs((c0 + c1) / 2 / scale - 400) <= 2
    assert (sketch <= box).all() and sketch.sum() < box.sum()  # the stroke itself, as wide as the brush
    thickness = sketch[:, round(400 * scale)].sum() / scale
    assert abs(thickness - (2 * radius + 1)) <= 3, thickness


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.browser
def test_dicom_window_and_nifti_slice_controls_reload_the_image(server):
    url, _ = server
    dicom, nifti = dicom_file(), nifti_file()
    with browser_page(url) as page:
        upload_file(page, dicom, "CT_small.dcm: the file's own window")
        assert info_text(page, 'image_info') == image_info((128, 128))
        page.locator('#window input').click()
        page.get_by_role('option', name='CT lung (-600, 1500)').click()
        wait_file_info(page, 'CT_small.dcm: window centre -600, width 1500')
        assert [page.locator(f'#{n} input').input_value() for n in ('centre', 'width')] == ['-600', '1500']
        lung = drawn_region(page, (128, 128))
        page.locator('#centre input').fill('40')
        page.locator('#width input').fill('80')
        page.locator('#width input').press('Enter')
        wait_file_info(page, 'CT_small.dcm: window centre 40, width 80')
        assert page.locator('#window input').input_value() == 'CT brain (40, 80)'  # the preset it matches
        upload_file(page, nifti, 'anatomical.nii: slice 12 of 0..24')
        assert not page.locator('#window').is_visible()
        assert page.locator('#slice input[type=range]').evaluate('e => [e.min, e.max, e.value]') == ['0', '24', '12']
        page.locator('#slice input[type=number]').fill('3')
        wait_file_info(page, 'anatomical.nii: slice 3 of 0..24')
        slice3 = drawn_region(page, (41, 33))
    filled_rectangle(region_on(lung, demo_resize(load_dicom(dicom, (-600, 1500)), 336)))
    filled_rectangle(region_on(slice3, demo_resize(load_nifti(nifti, index=3), 336)))


def drawn_region(page, size: tuple[int, int]) -> np.ndarray:
    """The region picture after a short Box stroke around the centre of the loaded (H, W) image."""
    h, w = size
    shown = picture_src(page, 'region')
    draw(page, 'Box', [(w / 2 - 4, h / 2 - 3), (w / 2 + 4, h / 2 + 3)], size)
    return wait_picture(page, 'region', shown)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.browser
def test_synthetic_weights_show_the_demo_notice_and_the_questions_they_know(server):
    url, _ = server
    with browser_page(url) as page:
        assert DEMO_NOTICE in info_text(page, 'notice')
        buttons = page.locator('#examples button')
        buttons.first.wait_for()
        assert buttons.all_inner_texts() == demo_questions()
        for k in (0, 2):
            buttons.nth(k).click()
            page.wait_for_function('q => document.querySelector("#question textarea").value === q',
                                   arg=demo_questions()[k], timeout=20_000)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.browser
def test_a_user_error_is_one_line_in_the_server_log(server, tmp_path, np_rng):
    url, log = server

    def new_lines(before: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(log.read_text().splitlines()) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # anything gradio would print after it (a traceback) comes now
        return log.read_text().splitlines()[before:]

    Image.fromarray(np_rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)).save(tmp_path / 'small.png')
    with browser_page(url) as page:
        before = len(log.read_text().splitlines())
        got = ask(page, 'Where is the heart in this image?')
        assert got.errors == ['upload an image first'] and got.text == ''
        assert new_lines(before) == ['medplib-jax serve: upload an image first']
        upload_image(page, str(tmp_path / 'small.png'))
        before = len(log.read_text().splitlines())
        got = ask(page, 'Is <region> brighter than <region>?')  # two slots, no region drawn
        line = 'predict: the question marks 2 regions with <region></region> but 0 region prompts were given'
        assert got.errors == [line], 'the pop-up shows the message as text, not as HTML'
        assert new_lines(before) == [f'medplib-jax serve: {line}']


@pytest.mark.slow
def test_demo_notice_and_questions_only_for_synthetic_weights():
    def texts(app) -> list[str]:
        return [str(getattr(block, 'value', '')) for block in app.blocks.values()]

    for synthetic_data in (True, False):
        app, _ = build_app(types.SimpleNamespace(synthetic=synthetic_data))
        assert any(DEMO_NOTICE in text for text in texts(app)) == synthetic_data
        assert (set(demo_questions()) <= set(texts(app))) == synthetic_data
    # The questions the synthetic set was made of, as a user types them (a region question's <region> shorthand).
    assert demo_questions() == [
        'Could you segment out the liver in this image?', 'Where is the heart in this image?',
        'Can you describe what is seen at the area <region>?', 'What can you interpret from this image?',
        'Which imaging modality is this? Options: CT, MR, X-ray, dermoscopy']
    assert '<image>\n' + with_region_slots(demo_questions()[2], 1) == synthetic.REGION_Q.format(ref='')


def test_a_mask_answer_shows_its_size_for_seg():
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:7] = True
    assert shown_answer('Sure, it is <SEG>.', mask) == 'Sure, it is mask: 12 px.'
    assert shown_answer('<SEG>', mask) == 'mask: 12 px'
    assert shown_answer('The liver.', mask) == 'The liver. (mask: 12 px, no <SEG>: the fallback state)'
    assert shown_answer('The liver.', None) == 'The liver.'


def test_strokes_become_the_reference_demos_regions():
    strokes = np.zeros((50, 60), bool)
    strokes[10, 5:9] = True  # columns 5..8 on row 10, rows 11..14 on column 30
    strokes[11:15, 30] = True
    point = stroke_region(strokes, 'Point')  # torch.median: the lower middle of x = 5,6,7,8,30x4 and y = 10x4,11..14
    assert point.kind == 'point' and point.value == (8.0, 10.0)
    square = point.to_mask(50, 60)
    assert square[0:31, 0:29].all() and square.sum() == 31 * 29  # the 41x41 square cut by the top / left edges
    box = stroke_region(strokes, 'Box')
    assert box.kind == 'box' and box.value == (5.0, 10.0, 30.0, 14.0)  # x0, y0, x1, y1: not transposed
    want = np.zeros((50, 60), bool)
    want[10:15, 5:31] = True
    np.testing.assert_array_equal(box.to_mask(50, 60), want)
    sketch = stroke_region(strokes, 'Sketch')
    np.testing.assert_array_equal(sketch.to_mask(50, 60), strokes)
    assert stroke_region(np.zeros((50, 60), bool), 'Box') is None and stroke_region(None, 'Point') is None
    with pytest.raises(ValueError, match="referring input type 'Circle'"):
        stroke_region(strokes, 'Circle')
    # As the model receives it: the region drawn on the upload follows it to the demo's size (nearest).
    image = np.zeros((50, 60, 3), np.uint8)
    resized, region = model_view(image, strokes, 'Box', 100)
    assert resized.shape == (100, 120, 3) and region.shape == (100, 120)
    np.testing.assert_array_equal(region, np.kron(want, np.ones((2, 2), bool)))
    assert model_view(image, None, 'Box', 100)[1] is None


def test_editor_value_and_the_demo_resize(np_rng):
    image = np_rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    layer = np.zeros((40, 30, 4), np.uint8)
    layer[3:7, 2:5] = (255, 40, 40, 255)
    got, strokes = editor_arrays({'background': np.dstack([image, np.full((40, 30), 255, np.uint8)]),
                                  'layers': [layer], 'composite': None})
    np.testing.assert_array_equal(got, image)
    np.testing.assert_array_equal(strokes, layer[..., 3] > 0)
    assert editor_arrays(None) == (None, None)
    # resize_image_to_shortest_edge: the long edge is int(336 * aspect), truncated; PIL LANCZOS
    assert demo_resize(image, 336).shape == (448, 336, 3)
    wide = np_rng.integers(0, 256, size=(100, 301, 3), dtype=np.uint8)
    np.testing.assert_array_equal(demo_resize(wide, 336),
                                  np.asarray(Image.fromarray(wide).resize((1011, 336), Image.LANCZOS)))
    assert demo_resize(wide, 0) is wide
    assert image_info(wide.shape) == '301 x 100 px image (the model receives 1011 x 336); brush radius 2 px'
    assert [brush_radius((h, 2000)) for h in (50, 336, 600, 1024)] == [2, 3, 6, 10]


def test_dicom_and_nifti_uploads_load_with_a_window_or_a_slice():
    dicom, nifti = dicom_file(), nifti_file()
    value = load_upload(dicom)
    want = load_dicom(dicom)  # the file's own window, else the modality preset
    assert want.shape == (128, 128, 3)
    np.testing.assert_array_equal(value['background'], want)
    image, strokes = editor_arrays(value)
    np.testing.assert_array_equal(image, want)
    assert not strokes.any()
    lung = load_upload(dicom, window=(-600, 1500))['background']
    np.testing.assert_array_equal(lung, load_dicom(dicom, (-600, 1500)))
    assert not np.array_equal(lung, want)
    assert nifti_slices(nifti) == 25
    np.testing.assert_array_equal(load_upload(nifti)['background'], load_nifti(nifti, index=12))
    np.testing.assert_array_equal(load_upload(nifti, slice_index=3)['background'], load_nifti(nifti, index=3))
    assert [image_kind(p) for p in ('a.DCM', 'b.nii', 'c.nii.gz', 'd.png')] == ['dicom', 'nifti', 'nifti', 'image']
    assert file_info(dicom) == "CT_small.dcm: the file's own window (else the modality preset)"
    assert file_info(dicom, window=(40.0, 400.0)) == 'CT_small.dcm: window centre 40, width 400'
    assert file_info(nifti, slices=25) == 'anatomical.nii: slice 12 of 0..24'
    assert file_info(nifti, slice_index=3, slices=25) == 'anatomical.nii: slice 3 of 0..24'
    with pytest.raises(ValueError, match='slice 25 outside 0..24'):
        load_upload(nifti, slice_index=25)


def test_port_is_checked_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()  # another server on the port
        port = taken.getsockname()[1]
        with pytest.raises(ChatError, match=rf'--port={port}: 127.0.0.1:{port} is not free'):
            check_port(port)
    with pytest.raises(ChatError, match='--port=70000: expected 1..65535'):
        check_port(70000)
