"""Drives `medplib-jax serve`'s page in headless chromium as a user does (Debian's chromium through playwright, no
browser download; `.ci/run` installs it). Not a test module: tests call it.

    answer = ask_page('http://127.0.0.1:7860/', 'scan.png', 'Could you segment out the liver in this image?')
    answer.text, answer.mask      # the answer box, whether a mask overlay appeared

The pieces (`browser_page`, `upload_image`, `upload_file`, `draw`, `ask`, `pictures`) drive one page step by step.
Strokes are given in the upload's pixel coordinates (x, y): the editor shows the image centred on its canvas at the
zoom its toolbar reads out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

CHROMIUM = '/usr/bin/chromium'  # Debian's chromium (`apt-get install chromium`); playwright downloads no browser
CHROMIUM_FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']
PICTURES = ('overlay', 'routing', 'region')  # the page's output images, by elem_id
TOAST = '[data-testid="toast-body"]'  # gradio's pop-up (gr.Error)
MARKDOWN = '[data-testid="markdown"]'  # a gr.Markdown's text (beside it: a hidden progress text)


def info_text(page, name: str) -> str:
    """The text of the page's Markdown `name` ('image_info': the image's size and brush; 'file_info': the DICOM
    window or NIfTI slice shown; 'notice': the demo notice)."""
    return page.locator(f'#{name} {MARKDOWN}').inner_text().strip()


@dataclasses.dataclass
class PageAnswer:
    """What the page shows after Ask: the answer box's text ('' when it shows an error), whether a mask overlay
    appeared, the error pop-ups' texts, and the pictures shown ({'overlay' | 'routing' | 'region': RGB array})."""
    text: str
    mask: bool
    errors: list[str]
    pictures: dict[str, np.ndarray]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    """A running `medplib-jax serve`: its URL, process and log file (stdout and stderr)."""
    url: str
    proc: subprocess.Popen
    log: str

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, as a service manager stops it; its exit status (killed after `timeout_s`)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def serving(checkpoint: str, log: str, *flags: str, cwd: str = ROOT, env: dict | None = None,
            timeout_s: float = 180) -> Iterator[Server]:
    """`medplib-jax serve --checkpoint=... FLAGS` on a free port, started from `cwd` as a user starts it; yields once
    the page answers, stopped (SIGTERM) afterwards. A server that exits or does not answer fails with its log."""
    port = free_port()
    env = dict(env if env is not None else os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING='utf-8')
    with open(log, 'wb') as out:
        proc = subprocess.Popen([sys.executable, '-m', 'medplib_jax', 'serve', f'--checkpoint={checkpoint}',
                                 f'--port={port}', *flags], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    server = Server(f'http://127.0.0.1:{port}/', proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f'serve exited with {proc.returncode}:\n{_tail(log)}')
            try:
                with urllib.request.urlopen(server.url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f'serve did not answer on {server.url} in {timeout_s:.0f} s:\n{_tail(log)}')
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors='replace') as f:
        return f.read()[-chars:]


def check_chromium() -> None:
    """A one-line error naming the fix when Debian's chromium is missing."""
    if not (os.path.isfile(CHROMIUM) and shutil.which('chromium')):
        raise FileNotFoundError(f"{CHROMIUM} is missing: driving the page needs Debian's chromium "
                                '(`apt-get install -y chromium`; .ci/run installs it)')


@contextlib.contextmanager
def browser_page(url: str, *, width: int = 1280, height: int = 1000) -> Iterator:
    """A playwright page of headless chromium (a fresh profile in a temporary folder) on `url`; closed after."""
    from playwright.sync_api import sync_playwright
    check_chromium()
    with tempfile.TemporaryDirectory(prefix='medplib_browser_') as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={'width': width, 'height': height})
        try:
            page = context.new_page()
            page.goto(url)
            yield page
        finally:
            context.close()


def upload_image(page, path: str, timeout_s: float = 60) -> tuple[int, int]:
    """Uploads a PNG / JPEG through the editor's own upload button; returns its (H, W) once the page has taken it
    (its info line names the size and the brush is sized to it)."""
    with Image.open(path) as im:
        w, h = im.size
    with page.expect_file_chooser() as chooser:
        page.locator('#image [aria-label="Upload"]').first.click()
    chooser.value.set_files(path)
    page.locator('#image canvas').first.wait_for()
    page.locator(f'#image_info {MARKDOWN}').get_by_text(f'{w} x {h} px image').wait_for(timeout=timeout_s * 1000)
    wait_brush(page, timeout_s)
    return h, w


def wait_brush(page, timeout_s: float = 60) -> None:
    """Waits until the editor's brush has the radius the page's info line gives (the editor applies it a moment
    after the line shows), read from the editor's Brush Size control (opened, again if a re-render closed it, then
    closed)."""
    radius = re.search(r'brush radius (\d+) px', info_text(page, 'image_info'))
    if radius is None:
        raise RuntimeError(f'the page names no brush radius: {info_text(page, "image_info")!r}')
    deadline, shown = time.monotonic() + timeout_s, None
    while shown != radius.group(1):
        if time.monotonic() > deadline:
            raise TimeoutError(f'the brush radius stays {shown}, the page says {radius.group(1)}')
        shown = page.evaluate('() => document.querySelector("#image input[type=range]")?.value ?? null')
        if shown is None:
            page.locator('#image button[aria-label="Brush Size"]').click()
        page.wait_for_timeout(200)
    page.locator('#image button[aria-label="Brush"]').click()  # closes the control, the brush still chosen
    page.locator('#image input[type=range]').wait_for(state='detached', timeout=timeout_s * 1000)


def upload_file(page, path: str, expect: str, timeout_s: float = 60) -> None:
    """Uploads a DICOM / NIfTI file through the file box; returns once the page's file line holds `expect`."""
    clear = page.locator('#medical button[aria-label="Clear"]')
    if clear.count():  # a file is loaded: its box takes a new one once cleared
        clear.first.click()
    page.locator('#medical input[type=file]').set_input_files(path)
    wait_file_info(page, expect, timeout_s)


def wait_file_info(page, expect: str, timeout_s: float = 60) -> None:
    """Waits until the line about the loaded DICOM / NIfTI file holds `expect` (the editor then holds the image)
    and the brush is sized to it."""
    page.locator(f'#file_info {MARKDOWN}').get_by_text(expect).wait_for(timeout=timeout_s * 1000)
    wait_brush(page, timeout_s)


def draw(page, mode: str, stroke: Sequence[tuple[float, float]], size: tuple[int, int]) -> None:
    """Chooses the referring input type and drags the brush through `stroke`, (x, y) pixels of the upload of
    (H, W) `size`."""
    page.get_by_label(mode, exact=True).check()
    canvas = page.locator('#image canvas').first
    canvas.scroll_into_view_if_needed()
    zoom = page.locator('#image').get_by_text(re.compile(r'^\s*\d+%\s*$'))  # the toolbar's zoom read-out
    scale, box = int(zoom.inner_text().strip().rstrip('%')) / 100, canvas.bounding_box()
    h, w = size

    def screen(x: float, y: float) -> tuple[float, float]:
        return (box['x'] + box['width'] / 2 + (x + 0.5 - w / 2) * scale,
                box['y'] + box['height'] / 2 + (y + 0.5 - h / 2) * scale)

    page.mouse.move(*screen(*stroke[0]))
    page.mouse.down()
    for point in stroke[1:]:
        page.mouse.move(*screen(*point), steps=4)
    page.mouse.up()


def picture_src(page, name: str) -> str | None:
    """The address of the picture an output image shows, None while it shows none."""
    picture = page.locator(f'#{name} img')
    return picture.first.get_attribute('src') if picture.count() else None


def wait_picture(page, name: str, previous: str | None = None, timeout_s: float = 60) -> np.ndarray:
    """The picture output `name` shows once it differs from `previous` (an address from `picture_src`)."""
    page.wait_for_function(
        '([name, previous]) => { const img = document.querySelector(`#${name} img`);'
        ' return img !== null && img.getAttribute("src") && img.getAttribute("src") !== previous; }',
        arg=[name, previous], timeout=timeout_s * 1000)
    return fetch_png(picture_src(page, name))


def ask(page, question: str, timeout_s: float = 120) -> PageAnswer:
    """Closes the pop-ups shown, types the question, presses Ask and waits for a new answer or an error pop-up (on
    a page that answered before, an answer equal to the previous one is not told from it: ask on a fresh page)."""
    for close in page.locator(f'{TOAST} [data-testid="toast-close"]').all():
        close.click()
    page.locator(TOAST).first.wait_for(state='detached', timeout=10_000)
    before = page.locator('#answer textarea').input_value()
    page.locator('#question textarea').fill(question)
    page.locator('#ask').click()
    page.wait_for_function(
        '([before, toast]) => { const v = document.querySelector("#answer textarea").value;'
        ' return (v.length > 0 && v !== before) || document.querySelector(toast) !== null; }',
        arg=[before, TOAST], timeout=timeout_s * 1000)
    errors = page.locator(f'{TOAST} [data-testid="toast-text"]').all_inner_texts()
    # The answer and the pictures come in one update, rendered together.
    return PageAnswer(page.locator('#answer textarea').input_value(), page.locator('#overlay img').count() > 0,
                      errors, pictures(page))


def pictures(page) -> dict[str, np.ndarray]:
    """The output pictures the page shows now, by name."""
    return {name: fetch_png(src) for name in PICTURES if (src := picture_src(page, name))}


def fetch_png(src: str) -> np.ndarray:
    """An output picture (a PNG served by the page) as an RGB array."""
    with urllib.request.urlopen(src, timeout=10) as r:
        data = r.read()
    with Image.open(io.BytesIO(data)) as im:
        if im.format != 'PNG':
            raise ValueError(f'{src}: a {im.format} picture, expected PNG')
        return np.asarray(im.convert('RGB'))


def ask_page(url: str, image: str, question: str, *, mode: str = 'Sketch',
             stroke: Sequence[tuple[float, float]] = (), timeout_s: float = 120) -> PageAnswer:
    """Opens the page, uploads `image` (PNG / JPEG), draws `stroke` ((x, y) upload pixels) in `mode` if given, asks
    `question`; what the page then shows."""
    with browser_page(url) as page:
        size = upload_image(page, image, timeout_s)
        if stroke:
            draw(page, mode, stroke, size)
            wait_picture(page, 'region', timeout_s=timeout_s)  # the page has the stroke
        return ask(page, question, timeout_s)
