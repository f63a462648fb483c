"""`medplib-jax serve` in a real headless browser (Debian's chromium driven by playwright; `.ci/run` installs it):
the server runs as a user starts it (a subprocess on a free localhost port) on a tiny randomly initialised MoE
MedPLIB; the page gets a synthetic image uploaded, a box drawn with the mouse and a grounding question; the answer,
the mask overlay, the routing picture and the region picture must appear. The page's answer and pictures are
checked against `serve.respond` run in this process on the same request. Also, without a browser: the demo's stroke ->
region rules, the upload resize, a DICOM upload and the port check."""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from medplib_jax.chat import ChatError, build_predictor
from medplib_jax.data.images import load_dicom
from medplib_jax.serve import (DEMO_TEMPERATURE, check_port, demo_resize, editor_arrays, load_upload, respond,
                               stroke_region)
from tiny_params import random_params_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = '/usr/bin/chromium'  # Debian's chromium (`apt-get install chromium`); playwright downloads no browser
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']
MAX_NEW = 4
QUESTION = 'Please segment the lesion in this region.'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def params_dir(tmp_path_factory):
    return random_params_dir(str(tmp_path_factory.mktemp('serve') / 'params'))


@pytest.fixture(scope='module')
def server(params_dir, tmp_path_factory):
    """`medplib-jax serve` on a free port, `--mask_mode=always` so a random model's answer has a mask; yields
    its URL once the page answers, stops it afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp('serve_log') / 'serve.log'
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING='utf-8',
               GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp('gradio')))
    with open(log, 'wb') as out:
        proc = subprocess.Popen([sys.executable, '-m', 'medplib_jax.cli', 'serve', f'--checkpoint={params_dir}',
                                 f'--port={port}', f'--max_new_tokens={MAX_NEW}', '--mask_mode=always'],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f'http://127.0.0.1:{port}/'
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f'serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}')
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f'serve did not answer on {url} in 180 s:\n{log.read_text()[-3000:]}')
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fetch_png(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=10) as r:
        data = r.read()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == 'PNG', src
        return np.asarray(im.convert('RGB'))


def test_browser_uploads_draws_a_box_asks_and_sees_answer_and_pictures(server, params_dir, tmp_path, np_rng):
    assert os.path.isfile(CHROMIUM) and shutil.which('chromium'), (
        f'{CHROMIUM} is missing: the browser test needs Debian\'s chromium (`apt-get install -y chromium`; '
        '.ci/run installs it)')
    from playwright.sync_api import sync_playwright
    url, log = server
    image = np_rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / 'scan.png')
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(  # a fresh profile (--user-data-dir) in tmp_path
            str(tmp_path / 'profile'), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={'width': 1280, 'height': 1000})
        try:
            page = browser.new_page()
            page.goto(url)
            with page.expect_file_chooser() as chooser:  # the image editor's own upload button
                page.locator('#image [aria-label="Upload"]').first.click()
            chooser.value.set_files(str(tmp_path / 'scan.png'))
            canvas = page.locator('#image canvas').first
            canvas.wait_for()
            page.get_by_label('Box').check()
            canvas.scroll_into_view_if_needed()
            page.wait_for_timeout(300)  # the image settles on the canvas
            b = canvas.bounding_box()
            x, y = b['x'] + 0.3 * b['width'], b['y'] + 0.3 * b['height']
            page.mouse.move(x, y)  # a diagonal brush stroke: Box mode asks about its bounding rectangle
            page.mouse.down()
            for k in range(1, 6):
                page.mouse.move(x + 16 * k, y + 10 * k)
            page.mouse.up()
            page.locator('#question textarea').fill(QUESTION)
            page.locator('#ask').click()
            page.wait_for_function("document.querySelector('#answer textarea').value.length > 0 || "
                                   "document.querySelector('.toast-body') !== null", timeout=120_000)
            errors = page.locator('.toast-body').all_inner_texts()
            assert not errors, f'the page shows an error: {errors}\n{log.read_text()[-3000:]}'
            answer = page.locator('#answer textarea').input_value()
            pictures = {}
            for name in ('overlay', 'routing', 'region'):
                picture = page.locator(f'#{name} img')
                picture.wait_for(timeout=20_000)
                pictures[name] = fetch_png(picture.get_attribute('src'))
        finally:
            browser.close()
    # The region picture tints the box red on the upload resized to the demo's 336 shortest edge: the pixels it
    # changed form a filled rectangle, the bounding box of the stroke.
    resized = demo_resize(image, 336)
    assert resized.shape == (336, 448, 3) and pictures['region'].shape == resized.shape
    drawn = (pictures['region'] != resized).any(-1)
    rows, cols = np.nonzero(drawn)
    assert 10 < len(rows) < drawn.size // 2, 'the box should cover part of the image'
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    assert drawn[r0:r1 + 1, c0:c1 + 1].all() and drawn.sum() == (r1 - r0 + 1) * (c1 - c0 + 1)
    assert r1 - r0 > 10 and c1 - c0 > 10
    # The same request in this process: the first request of the page samples with key 0.
    box = np.zeros(resized.shape[:2], bool)
    box[r0:r1 + 1, c0:c1 + 1] = True
    predictor = build_predictor(params_dir, max_new_tokens=MAX_NEW, temperature=DEMO_TEMPERATURE)
    want = respond(predictor, resized, box, 'Sketch', QUESTION, mask_mode='always', rng=jax.random.key(0))
    assert answer == want.text
    np.testing.assert_array_equal(pictures['overlay'], np.asarray(want.overlay.convert('RGB')))
    np.testing.assert_array_equal(pictures['routing'], np.asarray(want.routing.convert('RGB')))
    np.testing.assert_array_equal(pictures['region'], np.asarray(want.region.convert('RGB')))


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


def test_a_dicom_upload_fills_the_editor_with_its_default_window():
    import pydicom.data
    path = pydicom.data.get_testdata_file('CT_small.dcm', download=False)
    value = load_upload(path)
    want = load_dicom(path)  # the file's own window, else the modality preset
    assert want.shape == (128, 128, 3)
    np.testing.assert_array_equal(value['background'], want)
    image, strokes = editor_arrays(value)
    np.testing.assert_array_equal(image, want)
    assert not strokes.any()


def test_port_is_checked_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()  # another server on the port
        port = taken.getsockname()[1]
        with pytest.raises(ChatError, match=rf'--port={port}: 127.0.0.1:{port} is not free'):
            check_port(port)
    with pytest.raises(ChatError, match='--port=70000: expected 1..65535'):
        check_port(70000)
