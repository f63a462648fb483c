"""`medplib-jax serve`: a web demo like the reference's (model/serve/gradio_web_server.py), on 127.0.0.1.

    pip install -e ".[serve]" && medplib-jax serve --checkpoint=runs/demo/stage4 [--port=7860]

Upload an image (or a DICOM / NIfTI file), pick the referring input type (Point / Box / Sketch, as the reference),
draw on the image, ask; the page shows the answer, the mask overlay (when the answer holds `<SEG>`, or always with
`--mask_mode=always`), the expert of every answer token (MoE models) and the region as the model receives it.
As the reference demo: a stroke in Point mode becomes the 41x41 square around the median stroke pixel (torch's lower
median), in Box mode the stroke's filled bounding rectangle (without the demo's row / column mix-up, facts 12.27),
in Sketch mode the stroke itself; no stroke, no region. A question about a region without `<region>` gets one
appended (chat.py `with_region_slots`). Uploads are first resized so their shortest edge is 336 (PIL LANCZOS,
int() sizes: conversation_demo.py `resize_image_to_shortest_edge`), so masks come back at that size; the strokes are
resized with them (nearest). `--shortest_edge=0` keeps the upload's size. Decoding samples at temperature 0.2 (the
demo's hidden slider; its worker ignores top-p), `--temperature=0` decodes greedily; the demo's 512 new tokens.
No network access: gradio's analytics are off and the theme uses local fonts.

`respond` is the whole of one request without a browser; `build_app` wires it into gradio.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import threading
from typing import Any

import numpy as np
from PIL import Image

from medplib_jax.chat import build_predictor, token_texts, with_region_slots
from medplib_jax.data.regions import RegionPrompt
from medplib_jax.data.visualize import tint

MODES = ('Point', 'Box', 'Sketch')  # the reference's "Referring Input Type" radio, Sketch its default
DEMO_SHORTEST_EDGE = 336  # conversation_demo.py: get_images -> resize_image_to_shortest_edge(image, 336)
DEMO_TEMPERATURE = 0.2  # gradio_web_server.py: the (hidden) temperature slider's value
REGION_COLOUR = (255, 40, 40)


@dataclasses.dataclass
class Reply:
    """One answered request: the answer text, the image with the predicted mask (or None), the answer's tokens
    coloured by expert (MoE models, else None) and the image with the region the model received (or None)."""
    text: str
    overlay: Image.Image | None = None
    routing: Image.Image | None = None
    region: Image.Image | None = None


def editor_arrays(value: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """gradio's ImageEditor value ({'background', 'layers', 'composite'} numpy arrays) -> the image (H, W, 3) uint8
    and the strokes (H, W) bool: every pixel any layer painted (alpha > 0); (None, None) without an image."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        return _rgb(value), None
    image = value.get('background')
    image = value.get('composite') if image is None else image
    if image is None:
        return None, None
    image = _rgb(image)
    strokes = np.zeros(image.shape[:2], bool)
    for layer in value.get('layers') or ():
        layer = np.asarray(layer)
        if layer.shape[:2] == strokes.shape:
            strokes |= layer[..., -1] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else layer.reshape(
                strokes.shape + (-1,)).any(-1)
    return image, strokes


def _rgb(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def stroke_region(strokes: np.ndarray | None, mode: str) -> RegionPrompt | None:
    """The reference demo's `draw` + `generate_mask_for_feature`: Point -> the square around the (lower) median
    stroke pixel, Box -> the stroke's bounding rectangle, Sketch -> the stroke; None without a stroke."""
    if mode not in MODES:
        raise ValueError(f'serve: referring input type {mode!r}; expected one of {", ".join(MODES)}')
    if strokes is None or not strokes.any():
        return None
    rows, cols = np.nonzero(strokes)
    if mode == 'Point':  # torch.median: the lower of the two middle values
        return RegionPrompt('point', (float(np.sort(cols)[(len(cols) - 1) // 2]),
                                      float(np.sort(rows)[(len(rows) - 1) // 2])))
    if mode == 'Box':
        return RegionPrompt('box', (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())))
    return RegionPrompt('mask', strokes.astype(np.uint8))


def demo_resize(image: np.ndarray, shortest_edge: int) -> np.ndarray:
    """conversation_demo.py `resize_image_to_shortest_edge`: PIL LANCZOS to shortest edge `shortest_edge`, the other
    edge int(shortest * aspect) (truncated); 0 keeps the image."""
    if not shortest_edge:
        return image
    h, w = image.shape[:2]
    if w < h:
        size = (shortest_edge, int(shortest_edge / (w / h)))
    else:
        size = (int(shortest_edge * (w / h)), shortest_edge)
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def respond(predictor, image: np.ndarray, strokes: np.ndarray | None, mode: str, question: str, *,
            mask_mode: str = 'auto', shortest_edge: int = DEMO_SHORTEST_EDGE, rng=None) -> Reply:
    """One request, as the page sends it: image (H, W, 3) uint8, strokes (H, W) bool or None, the referring input
    type, the question. Raises a one-line ValueError for what cannot be answered (no image, empty question)."""
    from medplib_jax.infer.overlay import overlay, routing_image
    from medplib_jax.infer.predict import Request
    if image is None:
        raise ValueError('upload an image first')
    if not question or not question.strip():
        raise ValueError('type a question')
    region = stroke_region(strokes, mode)
    resized = demo_resize(image, shortest_edge)
    regions = []
    if region is not None:
        drawn = region.to_mask(*image.shape[:2])
        if resized.shape != image.shape:  # the region drawn on the upload follows the image to its new size
            drawn = np.asarray(Image.fromarray(drawn).resize(resized.shape[1::-1], Image.NEAREST))
        regions = [RegionPrompt('mask', drawn)]
    text = with_region_slots(question, len(regions))
    p = predictor.predict_batch([Request(resized, text, regions)], mask=mask_mode,
                                routing=bool(predictor.mcfg.llm.moe_layers), rng=rng)[0]
    reply = Reply(p.text)
    if p.mask is not None:
        reply.overlay = overlay(resized, p.mask, question=text, answer=p.text, width=max(420, resized.shape[1]))
    if p.routing is not None and p.tokens:
        reply.routing = routing_image(token_texts(predictor.tokenizer, p.tokens), p.routing)
    if regions:
        reply.region = Image.fromarray(tint(resized, regions[0].value, REGION_COLOUR, alpha=0.5))
    return reply


def load_upload(path: str) -> dict[str, Any]:
    """A DICOM / NIfTI / PNG / JPEG file -> an ImageEditor value holding it (default window, middle slice)."""
    from medplib_jax.chat import load_chat_image
    image = load_chat_image(path)
    return {'background': image, 'layers': [], 'composite': image}


def build_app(predictor, *, mask_mode: str = 'auto', shortest_edge: int = DEMO_SHORTEST_EDGE):
    """The gradio page: image editor + referring type + question -> answer, mask overlay, routing, region."""
    import gradio as gr
    import jax
    lock, counter = threading.Lock(), itertools.count()

    def ask(editor, mode, question):
        image, strokes = editor_arrays(editor)
        try:
            with lock:  # one request at a time on the model
                reply = respond(predictor, image, strokes, mode, question, mask_mode=mask_mode,
                                shortest_edge=shortest_edge, rng=jax.random.key(next(counter)))
        except ValueError as e:  # PredictError, RegionError, ImageError: one line on the page
            raise gr.Error(str(e).splitlines()[0]) from None
        return reply.text, reply.overlay, reply.routing, reply.region

    def upload(file):
        if file is None:
            return gr.skip()
        try:
            return load_upload(file)
        except ValueError as e:
            raise gr.Error(str(e).splitlines()[0]) from None

    theme = gr.themes.Default(font=['sans-serif'], font_mono=['monospace'])  # no web fonts fetched
    with gr.Blocks(title='MedPLIB (JAX)', analytics_enabled=False) as app:
        gr.Markdown('# MedPLIB (JAX)\nUpload an image, choose how to refer to a region and draw it (optional), '
                    'ask. Use `<region>` in the question where the drawn region belongs (appended if missing). '
                    'Grounding questions ("Please segment the liver.") return a mask.')
        with gr.Row():
            with gr.Column(scale=4):
                editor = gr.ImageEditor(label='Image & region', type='numpy', sources=('upload', 'clipboard'),
                                        format='png', transforms=(), layers=False, elem_id='image',
                                        brush=gr.Brush(colors=['#ff2828'], color_mode='fixed'))
                medical = gr.File(label='or a DICOM / NIfTI file', file_types=['.dcm', '.nii', '.gz'],
                                  elem_id='medical')
                mode = gr.Radio(list(MODES), value='Sketch', label='Referring input type', elem_id='mode')
                question = gr.Textbox(label='Question', placeholder='Please segment the lesion in this image.',
                                      elem_id='question')
                submit = gr.Button('Ask', variant='primary', elem_id='ask')
            with gr.Column(scale=5):
                answer = gr.Textbox(label='Answer', interactive=False, elem_id='answer')
                mask_view = gr.Image(label='Mask overlay', type='pil', interactive=False, elem_id='overlay',
                                     format='png')
                routing_view = gr.Image(label='Expert per answer token', type='pil', interactive=False,
                                        elem_id='routing', format='png')
                region_view = gr.Image(label='Region as the model receives it', type='pil', interactive=False,
                                       elem_id='region', format='png')
        outputs = [answer, mask_view, routing_view, region_view]
        submit.click(ask, [editor, mode, question], outputs)
        question.submit(ask, [editor, mode, question], outputs)
        medical.upload(upload, medical, editor)
    return app, theme


def check_port(port: int) -> int:
    """--port: a free port on 127.0.0.1, checked before the model loads (gradio's own failure is a traceback)."""
    from medplib_jax.chat import ChatError
    if not 0 < port < 65536:
        raise ChatError(f'--port={port}: expected 1..65535')
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's port is free
        try:
            s.bind(('127.0.0.1', port))
        except OSError as e:
            raise ChatError(f'--port={port}: 127.0.0.1:{port} is not free ({e.strerror})') from None
    return port


def serve(checkpoint: str, *, port: int = 7860, mask_mode: str = 'auto', shortest_edge: int | None = None,
          max_new_tokens: int | None = None, temperature: float | None = None, tokenizer: str | None = None,
          block: bool = True):
    """Loads the model once and serves the page on http://127.0.0.1:PORT (never other interfaces)."""
    from medplib_jax import checkpoint as ckpt
    from medplib_jax.chat import ChatError, check_mask_mode
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ChatError('serve needs gradio: pip install -e ".[serve]"') from None
    if not checkpoint:
        raise ChatError('set --checkpoint=DIR (a run directory or a params directory)')
    check_mask_mode(mask_mode)
    check_port(port)
    shortest_edge = DEMO_SHORTEST_EDGE if shortest_edge is None else shortest_edge
    if shortest_edge < 0:
        raise ChatError(f'--shortest_edge={shortest_edge}: expected 0 (keep the size) or a positive size')
    ckpt.resolve_params_dir(checkpoint, '--checkpoint')
    predictor = build_predictor(checkpoint, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                                temperature=DEMO_TEMPERATURE if temperature is None else temperature)
    app, theme = build_app(predictor, mask_mode=mask_mode, shortest_edge=shortest_edge)
    print(f'medplib-jax serve: {ckpt.resolve_params_dir(checkpoint, "--checkpoint")} on http://127.0.0.1:{port}',
          flush=True)
    app.queue(default_concurrency_limit=1).launch(server_name='127.0.0.1', server_port=port, share=False,
                                                  ssr_mode=False, theme=theme, footer_links=[], quiet=True,
                                                  prevent_thread_lock=not block, mcp_server=False)
    return app
