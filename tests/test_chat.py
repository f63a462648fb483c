"""`medplib-jax chat` as a user runs it (a subprocess) on a params directory of a tiny randomly initialised MoE
MedPLIB: answers on a synthetic PNG and on a real DICOM that pydicom ships, the mask overlay, the routing line,
the interactive mode, and one-line errors. What the command prints is checked against the predict API run in this
process on the same request (the answer, the routing, the mask written to disk)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support.tiny_params import random_params_dir

from medplib_jax.data.images import load_dicom
from medplib_jax.data.regions import RegionError, RegionPrompt
from medplib_jax.infer.session import (
    ChatError,
    build_predictor,
    check_mask_mode,
    numbers,
    region_from_flags,
    token_texts,
    with_region_slots,
)
from medplib_jax.main.chat import overlay_paths, routing_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 4
CT_SMALL = 'CT_small.dcm'  # pydicom's own test data: a real 128x128 CT slice


def start_cli(*args, stdin=None, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING='utf-8')
    proc = subprocess.Popen([sys.executable, '-m', 'medplib_jax', *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd or ROOT)
    return proc, (stdin or '').encode()


def finish(started):
    """(exit status, stdout, stderr), decoded without newline translation (answers may hold a lone '\\r')."""
    proc, stdin = started
    stdout, stderr = proc.communicate(stdin, timeout=600)  # reads both pipes: a chatty stderr cannot block it
    return proc.returncode, stdout.decode(), stderr.decode()


def progress_only(stderr: str) -> bool:
    """stderr holds nothing but chat's progress lines (and the demo-weights notice)."""
    return all(line.startswith(('loading the parameters of ', 'answering (', 'note: '))
               for line in stderr.splitlines())


def run_cli(*args, stdin=None, cwd=None):
    return finish(start_cli(*args, stdin=stdin, cwd=cwd))


@pytest.fixture(scope='module')
def params_dir(tmp_path_factory):
    return random_params_dir(str(tmp_path_factory.mktemp('chat') / 'params'))


@pytest.fixture(scope='module')
def predictor(params_dir):
    return build_predictor(params_dir, max_new_tokens=MAX_NEW)


@pytest.fixture(scope='module')
def dicom():
    import pydicom.data
    path = pydicom.data.get_testdata_file(CT_SMALL, download=False)
    assert path and os.path.isfile(path), f'pydicom ships {CT_SMALL} in its wheel; not found: {path}'
    return path


@pytest.mark.slow
@pytest.mark.e2e
def test_png_with_a_box_prints_the_answer_routing_and_writes_the_overlay(params_dir, predictor, tmp_path, np_rng):
    image = np_rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / 'scan.png')
    out = tmp_path / 'pictures' / 'seg.png'
    out.parent.mkdir()
    rc, stdout, stderr = run_cli('chat', f'--checkpoint={params_dir}', f'--image={tmp_path}/scan.png',
                                 '--box=20,10,120,90', '--routing', '--mask_mode=always',
                                 f'--max_new_tokens={MAX_NEW}', f'--out={out}', 'What is in this region?')
    assert rc == 0, stderr[-3000:]
    # the same request through the predict API: the box, the question with the region slot appended
    want = predictor.predict(image, 'What is in this region? <region></region>',
                             [RegionPrompt('box', (20, 10, 120, 90))], mask='always', routing=True)
    routing = routing_line(token_texts(predictor.tokenizer, want.tokens), want.routing)
    assert routing.startswith('routing (2 MoE layers, expert per layer): ')
    assert want.routing.shape == (2, len(want.tokens))
    mask_png = str(out)[:-len('.png')] + '_mask.png'
    assert stdout == (f'{want.text}\n{routing}\nmask: {int(want.mask.sum())} of 30000 pixels (no <SEG>: the '
                      f'fallback state); overlay {out}, mask {mask_png}\n'), stdout
    with Image.open(mask_png) as m:
        np.testing.assert_array_equal(np.asarray(m) > 0, want.mask)
    with Image.open(out) as picture:
        assert picture.width == 420 and picture.height > 420 * 150 / 200  # the image above the question / answer
    assert progress_only(stderr)


@pytest.mark.slow
@pytest.mark.e2e
def test_interactive_mode_on_a_real_dicom_answers_each_stdin_question(params_dir, predictor, dicom, tmp_path):
    rc, stdout, stderr = run_cli('chat', f'--checkpoint={params_dir}', f'--image={dicom}', '--window=40,400',
                                 '--point=64,70', '--routing', f'--max_new_tokens={MAX_NEW}', cwd=tmp_path,
                                 stdin='What organ is at <region>?\n\nDescribe <region></region> please.\n')
    assert rc == 0, stderr[-3000:]
    image = load_dicom(dicom, (40.0, 400.0))
    assert image.shape == (128, 128, 3)
    want = ''
    for question in ('What organ is at <region></region>?', 'Describe <region></region> please.'):
        p = predictor.predict(image, question, [RegionPrompt('point', (64, 70))], routing=True)
        want += f'{p.text}\n{routing_line(token_texts(predictor.tokenizer, p.tokens), p.routing)}\n'
    assert stdout == want  # an answer and its routing per question; the blank stdin line is skipped
    assert progress_only(stderr)
    assert not list(tmp_path.glob('*.png'))  # mask_mode auto and no <SEG> from a random model: no overlay


@pytest.mark.slow
@pytest.mark.e2e
def test_errors_are_one_line_and_exit_2(params_dir, tmp_path, np_rng):
    Image.fromarray(np_rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)).save(tmp_path / 'ok.png')
    (tmp_path / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(np_rng.integers(0, 256, 64, dtype=np.uint8)))
    cases = [
        ((f'--image={tmp_path}/missing.png',), f'{tmp_path}/missing.png: image file not found'),
        ((f'--image={tmp_path}/corrupt.png',), f'{tmp_path}/corrupt.png: cannot decode image'),
        ((f'--image={tmp_path}/ok.png', '--box=10,10,80,50'), 'region box (10.0, 10.0, 80.0, 50.0) is outside the '
                                                              '80x60 image'),
    ]
    cases.append(((f'--image={tmp_path}/ok.png', f'--checkpoint={tmp_path}/nothing'),
                  f'--checkpoint: {tmp_path}/nothing: no parameters here'))
    runs = [start_cli('chat', f'--checkpoint={params_dir}', *args, 'What is here?') for args, _ in cases]
    for (args, message), proc in zip(cases, runs):  # the four run side by side
        rc, stdout, stderr = finish(proc)
        assert rc == 2 and stdout == '', (args, stderr[-2000:])
        assert stderr.count('\n') == 1 and stderr.startswith(f'medplib-jax chat: {message}'), stderr


def test_flag_values_are_checked_before_the_model_loads(tmp_path):
    size = (60, 80)
    with pytest.raises(ChatError, match=r'--point=1,2,3: expected 2 comma-separated numbers'):
        region_from_flags('1,2,3', None, None, size)
    with pytest.raises(ChatError, match=r'--box=a,b,c,d: expected 4'):
        region_from_flags(None, 'a,b,c,d', None, size)
    with pytest.raises(ChatError, match='--point and --box: give one region'):
        region_from_flags('1,2', '1,2,3,4', None, size)
    with pytest.raises(RegionError, match=r'region point \(80.0, 5.0\) is outside the 80x60 image'):
        region_from_flags('80,5', None, None, size)
    mask = np.zeros(size, np.uint8)
    mask[5:9, 7:30] = 255
    Image.fromarray(mask).save(tmp_path / 'region.png')
    (region,) = region_from_flags(None, None, str(tmp_path / 'region.png'), size)
    np.testing.assert_array_equal(region.to_mask(*size), mask > 0)
    assert numbers('window', ' -100, 1500 ', 2) == (-100.0, 1500.0)
    with pytest.raises(ChatError, match='expected 2'):
        numbers('window', '1,nan', 2)
    with pytest.raises(ChatError, match='--mask_mode=sometimes: expected one of auto, always, never'):
        check_mask_mode('sometimes')


def test_region_slots_follow_the_reference_demo():
    assert with_region_slots('What is this?', 1) == 'What is this? <region></region>'  # appended after a space
    assert with_region_slots('What is <region> here?', 1) == 'What is <region></region> here?'  # the demo's shorthand
    assert with_region_slots('What is <region></region>?', 1) == 'What is <region></region>?'
    assert with_region_slots('What is this?', 0) == 'What is this?'


def test_overlay_paths():
    assert overlay_paths(None, '/data/ct/vol.nii.gz', None) == ('vol_overlay.png', 'vol_overlay_mask.png')
    assert overlay_paths(None, 'a/b.dcm', 3) == ('b_overlay_3.png', 'b_overlay_3_mask.png')
    assert overlay_paths('out/x.png', 'a/b.dcm', None) == ('out/x.png', 'out/x_mask.png')


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_stops_chat_cleanly(params_dir, tmp_path, np_rng):
    """SIGTERM (a scheduler, `kill`) while the interactive mode waits for questions: one line, no stack dump."""
    import signal
    import time
    Image.fromarray(np_rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)).save(tmp_path / 'ok.png')
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING='utf-8')
    log = tmp_path / 'stderr.txt'
    with open(log, 'wb') as err:
        proc = subprocess.Popen([sys.executable, '-m', 'medplib_jax', 'chat', f'--checkpoint={params_dir}',
                                 f'--image={tmp_path}/ok.png'], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while 'loading the parameters' not in log.read_text():  # the model is loading, stdin still open
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            # Python raises the handler's KeyboardInterrupt when the main thread is back from a native call (the
            # restore, an XLA compile): that took over 120 s once on the loaded 2-core CI machine
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert proc.returncode == 130 and lines[-1] == 'medplib-jax chat: stopped', lines
    assert 'Traceback' not in log.read_text() and progress_only('\n'.join(lines[:-1]))
