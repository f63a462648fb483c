"""`medplib-jax serve`: a web demo like the reference's (model/serve/gradio_web_server.py), on 127.0.0.1.

    pip install -e ".[serve]" && medplib-jax serve --checkpoint=runs/demo/stage4 [--port=7860]

Upload an image (or a DICOM / NIfTI file), pick the referring input type (Point / Box / Sketch, as the reference),
draw on the image, ask; the page shows the answer, the mask overlay (when the answer holds `<SEG>`, or always with
`--mask_mode=always`), the expert of every answer token (MoE models) and the region as the model receives it.
As the reference demo: a stroke in Point mode becomes the 41x41 square around the median stroke pixel (torch's lower
median), in Box mode the stroke's filled bounding rectangle (without the row / column mix-up of the demo's
`generate_mask_for_feature`), in Sketch mode the stroke itself; no stroke, no region. A question about a region without
`<region>` gets one appended (infer/session.py `with_region_slots`). Uploads are first resized so their shortest edge
is 336 (PIL
LANCZOS, int() sizes: conversation_demo.py `resize_image_to_shortest_edge`), so masks come back at that size; the
strokes are resized with them (nearest). `--shortest_edge=0` keeps the upload's size. Decoding samples at temperature
0.2 (the demo's hidden slider; its worker ignores top-p), `--temperature=0` decodes greedily; the demo's 512 new tokens.

Beyond the reference's page: the region panel previews the region while it is drawn (Point's square, Box's
rectangle, the sketch), the brush is sized to the image (about 1 % of its shortest edge), a DICOM upload gets window
controls and a NIfTI one a slice slider, a mask answer shows "mask: N px" for its `<SEG>`, weights trained on the
synthetic demo data show `DEMO_NOTICE` and the questions they were trained on, and an error shown on the page is
one line in the server's log (not gradio's traceback). No network access: gradio's analytics are off and the theme
uses local fonts.

`respond` is the whole of one request without a browser; `build_app` wires it into gradio.
"""
from __future__ import annotations

import dataclasses
import html
import os
import socket
import sys
import threading
from typing import Any, Callable

import numpy as np
from PIL import Image

from medplib_jax.constants import DEMO_NOTICE
from medplib_jax.data.images import image_kind
from medplib_jax.data.regions import RegionPrompt
from medplib_jax.data.visualize import tint
from medplib_jax.infer.session import REGION_SLOT, build_predictor, token_texts, with_region_slots

MODES = ('Point', 'Box', 'Sketch')  # the reference's "Referring Input Type" radio, Sketch its default
DEMO_SHORTEST_EDGE = 336  # conversation_demo.py: get_images -> resize_image_to_shortest_edge(image, 336)
DEMO_TEMPERATURE = 0.2  # gradio_web_server.py: the (hidden) temperature slider's value
REGION_COLOUR = (255, 40, 40)
SEG = '<SEG>'
ROUTING_TITLE = 'Expert per answer token (strips: one per MoE layer, first on top)'
# DICOM display windows (centre, width) the page offers; None: the file's own, else the modality preset (load_dicom).
WINDOWS = {'default': None, 'CT soft tissue (40, 400)': (40.0, 400.0), 'CT lung (-600, 1500)': (-600.0, 1500.0),
           'CT bone (400, 1800)': (400.0, 1800.0), 'CT brain (40, 80)': (40.0, 80.0)}
DEFAULT_WINDOW = 'default'
CUSTOM_WINDOW = 'custom (centre, width)'


@dataclasses.dataclass
class Reply:
    """One answered request: the answer as the page shows it (`shown_answer`), the image with the predicted mask (or
    None), the answer's tokens coloured by expert (MoE models, else None) and the image with the region the model
    received (or None)."""
    text: str
    overlay: Image.Image | None = None
    routing: Image.Image | None = None
    region: Image.Image | None = None
    raw: str = ''  # the model's answer as decoded (`text` shows its `<SEG>` as the mask's size)
    mask: np.ndarray | None = None  # the predicted mask at the resized upload's size


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


def demo_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """conversation_demo.py `resize_image_to_shortest_edge`'s (H, W): shortest edge `shortest_edge`, the other edge
    int(shortest * aspect) (truncated); 0 keeps the size."""
    if not shortest_edge:
        return height, width
    if width < height:
        return int(shortest_edge / (width / height)), shortest_edge
    return shortest_edge, int(shortest_edge * (width / height))


def demo_resize(image: np.ndarray, shortest_edge: int) -> np.ndarray:
    """The upload as the demo resizes it (`demo_size`, PIL LANCZOS); 0 keeps the image."""
    if not shortest_edge:
        return image
    size = demo_size(*image.shape[:2], shortest_edge)
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.LANCZOS))


def model_view(image: np.ndarray, strokes: np.ndarray | None, mode: str,
               shortest_edge: int = DEMO_SHORTEST_EDGE) -> tuple[np.ndarray, np.ndarray | None]:
    """The upload as the model receives it (`demo_resize`) and the drawn region at that size ((H, W) uint8, None
    without a stroke): the region is drawn on the upload, then follows the image to its new size (nearest)."""
    region = stroke_region(strokes, mode)
    resized = demo_resize(image, shortest_edge)
    if region is None:
        return resized, None
    drawn = region.to_mask(*image.shape[:2])
    if resized.shape != image.shape:
        drawn = np.asarray(Image.fromarray(drawn).resize(resized.shape[1::-1], Image.NEAREST))
    return resized, drawn


def region_picture(resized: np.ndarray, region: np.ndarray | None) -> Image.Image | None:
    """The "region as the model receives it" picture: the region tinted red on the resized upload."""
    return None if region is None else Image.fromarray(tint(resized, region, REGION_COLOUR, alpha=0.5))


def shown_answer(text: str, mask: np.ndarray | None) -> str:
    """The answer as the page shows it: its (first) `<SEG>` becomes "mask: N px", N the mask's pixel count; a mask
    without one (`--mask_mode=always`'s fallback state) is noted after the text."""
    if mask is None:
        return text
    pixels = f'mask: {int(np.count_nonzero(mask))} px'
    if SEG in text:
        return text.replace(SEG, pixels, 1)
    return f'{text} ({pixels}, no {SEG}: the fallback state)'


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
    resized, region = model_view(image, strokes, mode, shortest_edge)
    regions = [] if region is None else [RegionPrompt('mask', region)]
    text = with_region_slots(question, len(regions))
    p = predictor.predict_batch([Request(resized, text, regions)], mask=mask_mode,
                                routing=bool(predictor.mcfg.llm.moe_layers), rng=rng)[0]
    reply = Reply(shown_answer(p.text, p.mask), raw=p.text, region=region_picture(resized, region), mask=p.mask)
    if p.mask is not None:
        reply.overlay = overlay(resized, p.mask, question=text, answer=reply.text, width=max(420, resized.shape[1]))
    if p.routing is not None and p.tokens:
        reply.routing = routing_image(token_texts(predictor.tokenizer, p.tokens), p.routing, title=ROUTING_TITLE)
    return reply


def nifti_slices(path: str) -> int:
    """How many slices a NIfTI volume has along the axis `load_image` slices (the third), from its header."""
    import nibabel
    try:
        shape = nibabel.load(path).shape
    except Exception as e:  # nibabel raises many types for broken files
        raise ValueError(f'{os.path.basename(path)}: cannot read NIfTI ({type(e).__name__}: {e})') from None
    if len(shape) < 3:
        raise ValueError(f'{os.path.basename(path)}: expected a 3-D volume, got shape {shape}')
    return int(shape[2])


def load_upload(path: str, *, window: tuple[float, float] | None = None,
                slice_index: int | None = None) -> dict[str, Any]:
    """A DICOM / NIfTI / PNG / JPEG file -> an ImageEditor value holding it: a DICOM with `window` (centre, width;
    default: the file's own, else the modality preset), a NIfTI's slice `slice_index` (default the middle one)."""
    from medplib_jax.infer.session import load_chat_image
    image = load_chat_image(path, slice_index=slice_index,
                            window=None if window is None else f'{window[0]:g},{window[1]:g}')
    return {'background': image, 'layers': [], 'composite': image}


def brush_radius(shape: tuple[int, ...]) -> int:
    """The brush radius for an upload of (H, W, ...): about 1 % of its shortest edge, at least 2 pixels, so a
    stroke marks about what the user meant (gradio's default radius is 25 pixels whatever the image's size)."""
    return max(2, round(min(shape[:2]) / 100))


def demo_questions() -> list[str]:
    """What the synthetic demo model was trained to answer (data/synthetic.py's templates as a user types them):
    grounding (a mask), where, region (needs a drawn region), complex and the closed modality question."""
    from medplib_jax.data import synthetic as syn
    typed = lambda template, **fill: template.replace('<image>\n', '').format(**fill)  # noqa: E731
    return [typed(syn.GROUNDING_Q, name='liver'), typed(syn.WHERE_Q, name='heart'),
            typed(syn.REGION_Q, ref='').replace(REGION_SLOT, '<region>'), typed(syn.COMPLEX_Q),
            typed(syn.CLOSED_Q, options=', '.join(syn.MODALITY_OPTIONS))]


def demo_notice() -> str:
    """The page's notice for synthetic-data weights (Markdown): DEMO_NOTICE and what the model knows."""
    from medplib_jax.data.synthetic import MODALITIES
    known = '; '.join(f'{m.replace("_", "-")}: {", ".join(classes)}' for m, (*_, classes) in MODALITIES.items())
    return (f'**Notice: {DEMO_NOTICE}.** It answers the synthetic set\'s questions about its shapes ({known}); '
            'click an example below to fill the question. Other questions get arbitrary answers.')


def image_info(shape: tuple[int, ...], shortest_edge: int = DEMO_SHORTEST_EDGE) -> str:
    """The page's line about the image in the editor: its size, the size the model receives, the brush radius."""
    h, w = shape[:2]
    rh, rw = demo_size(h, w, shortest_edge)
    return f'{w} x {h} px image (the model receives {rw} x {rh}); brush radius {brush_radius(shape)} px'


def file_info(path: str, *, window: tuple[float, float] | None = None, slice_index: int | None = None,
              slices: int = 0) -> str:
    """The page's line about a DICOM / NIfTI file: the window or the slice shown ('' for PNG / JPEG)."""
    name, kind = os.path.basename(path), image_kind(path)
    if kind == 'dicom':
        shown = "the file's own window (else the modality preset)" if window is None else \
            f'window centre {window[0]:g}, width {window[1]:g}'
        return f'{name}: {shown}'
    if kind == 'nifti':
        return f'{name}: slice {slices // 2 if slice_index is None else slice_index} of 0..{slices - 1}'
    return ''


def build_app(predictor, *, mask_mode: str = 'auto', shortest_edge: int = DEMO_SHORTEST_EDGE,
              log: Callable[[str], None] | None = None):
    """The gradio page: image editor (+ DICOM window / NIfTI slice controls) + referring type + question -> answer,
    mask overlay, routing, region (previewed while drawing). `log`: one line per error the page shows (default:
    stderr)."""
    import gradio as gr
    import jax
    lock, answered = threading.Lock(), 0
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def user_error(e: Exception) -> Exception:
        """A pop-up with the error's first line, and that line, not gradio's traceback, in the server's log."""
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        log(f'medplib-jax serve: {line}')
        return gr.Error(html.escape(line), print_exception=False)  # gradio renders the message as HTML

    def ask(editor, mode, question):
        nonlocal answered
        image, strokes = editor_arrays(editor)
        try:
            with lock:  # one request at a time on the model; the n-th answered request samples with key n
                reply = respond(predictor, image, strokes, mode, question, mask_mode=mask_mode,
                                shortest_edge=shortest_edge, rng=jax.random.key(answered))
                answered += 1
        except ValueError as e:  # PredictError, RegionError, ImageError: one line on the page
            raise user_error(e) from None
        return reply.text, reply.overlay, reply.routing, reply.region

    def preview(editor, mode):
        image, strokes = editor_arrays(editor)
        return None if image is None else region_picture(*model_view(image, strokes, mode, shortest_edge))

    def edited(editor, mode):
        """Every change of the editor: the region preview; an image without strokes (just loaded, or all erased)
        also gets the brush sized to it and its info line (with strokes: the user's brush is left alone)."""
        image, strokes = editor_arrays(editor)
        if image is None:
            return None, gr.skip(), ''
        if strokes is not None and strokes.any():
            return preview(editor, mode), gr.skip(), gr.skip()
        return None, gr.ImageEditor(brush=_brush(brush_radius(image.shape))), image_info(image.shape, shortest_edge)

    # The editor fires no change event for a value set by the server: what follows a load is set with it.
    def load(file, chosen=None, index=None, slices=0) -> dict:
        kind = image_kind(file)
        chosen = chosen if kind == 'dicom' else None
        index = None if kind != 'nifti' or index is None else int(index)
        try:
            value = load_upload(file, window=chosen, slice_index=index)
        except ValueError as e:
            raise user_error(e) from None
        shape = value['background'].shape
        return {editor: gr.ImageEditor(value=value, brush=_brush(brush_radius(shape))),
                info: image_info(shape, shortest_edge), region_view: None,
                shown_file: file_info(file, window=chosen, slice_index=index, slices=slices)}

    def upload(file):
        if file is None:
            return {shown_file: '', dicom_row: gr.Row(visible=False), slice_index: gr.Slider(visible=False)}
        try:
            kind = image_kind(file)
            slices = nifti_slices(file) if kind == 'nifti' else 0
        except ValueError as e:
            raise user_error(e) from None
        slider = gr.Slider(minimum=0, maximum=slices - 1, value=slices // 2, step=1, visible=True) if slices > 1 \
            else gr.Slider(visible=False)  # a one-slice volume has nothing to choose
        return {**load(file, slices=slices), dicom_row: gr.Row(visible=kind == 'dicom'), slice_index: slider,
                window: DEFAULT_WINDOW, centre: None, width: None}

    def typed_window(file, centre_value, width_value):
        if not file:
            raise user_error(ValueError('upload a DICOM file first'))
        chosen = None
        if centre_value is not None or width_value is not None:  # both empty: the file's own window
            if centre_value is None or width_value is None or not width_value > 0:
                raise user_error(ValueError('set the window centre and a positive width (or pick a window)'))
            chosen = (float(centre_value), float(width_value))
        preset = next((name for name, w in WINDOWS.items() if w == chosen), CUSTOM_WINDOW)
        return {**load(file, chosen), window: preset}

    def pick_window(file, preset, centre_value, width_value):
        if preset == CUSTOM_WINDOW:
            return typed_window(file, centre_value, width_value)
        if not file:
            raise user_error(ValueError('upload a DICOM file first'))
        chosen = WINDOWS[preset]
        shown = (None, None) if chosen is None else chosen
        return {**load(file, chosen), centre: shown[0], width: shown[1]}

    def pick_slice(file, index):
        if not file:
            raise user_error(ValueError('upload a NIfTI file first'))
        return load(file, index=index, slices=nifti_slices(file))

    examples = demo_questions()
    theme = gr.themes.Default(font=['sans-serif'], font_mono=['monospace'])  # no web fonts fetched
    with gr.Blocks(title='MedPLIB (JAX)', analytics_enabled=False) as app:
        gr.Markdown('# MedPLIB (JAX)\nUpload an image (or a DICOM / NIfTI file), choose how to refer to a region and '
                    'draw it (optional: the region panel shows it as the model will receive it), ask. Use '
                    '`<region>` in the question where the drawn region belongs (appended if missing). Grounding '
                    f'questions ("{examples[0]}") return a mask.')
        if predictor.synthetic:
            gr.Markdown(demo_notice(), elem_id='notice')
        with gr.Row():
            with gr.Column(scale=4):
                editor = gr.ImageEditor(label='Image & region', type='numpy', sources=('upload', 'clipboard'),
                                        format='png', transforms=(), layers=False, elem_id='image',
                                        brush=_brush(2))  # until an image sizes it; gradio's default is 25 px
                info = gr.Markdown('', elem_id='image_info')
                medical = gr.File(label='or a DICOM / NIfTI file', file_types=['.dcm', '.nii', '.gz'],
                                  elem_id='medical')
                shown_file = gr.Markdown('', elem_id='file_info')
                with gr.Row(visible=False) as dicom_row:
                    window = gr.Dropdown([*WINDOWS, CUSTOM_WINDOW], value=DEFAULT_WINDOW, label='DICOM window',
                                         elem_id='window')
                    centre = gr.Number(label='centre (Enter applies)', elem_id='centre')
                    width = gr.Number(label='width (Enter applies)', elem_id='width')
                slice_index = gr.Slider(0, 1, value=0, step=1, label='NIfTI slice', visible=False, elem_id='slice')
                mode = gr.Radio(list(MODES), value='Sketch', label='Referring input type', elem_id='mode')
                question = gr.Textbox(label='Question', placeholder=examples[0], elem_id='question')
                if predictor.synthetic:  # buttons, not gr.Examples: that cuts examples at 60 characters
                    with gr.Column(elem_id='examples'):
                        gr.Markdown('What the demo model can be asked (click to fill the question):')
                        with gr.Row():
                            for k, text in enumerate(examples):
                                gr.Button(text, size='sm', scale=0, elem_id=f'example{k}').click(
                                    lambda text=text: text, None, question, concurrency_limit=None)
                submit = gr.Button('Ask', variant='primary', elem_id='ask')
            with gr.Column(scale=5):
                answer = gr.Textbox(label='Answer', interactive=False, elem_id='answer')
                mask_view = gr.Image(label='Mask overlay', type='pil', interactive=False, elem_id='overlay',
                                     format='png')
                # The title is inside the picture: gradio's label would cover the first tokens.
                routing_view = gr.Image(label=ROUTING_TITLE, show_label=False, type='pil', interactive=False,
                                        elem_id='routing', format='png')
                region_view = gr.Image(label='Region as the model receives it', type='pil', interactive=False,
                                       elem_id='region', format='png')
        outputs = [answer, mask_view, routing_view, region_view]
        submit.click(ask, [editor, mode, question], outputs)
        question.submit(ask, [editor, mode, question], outputs)
        # Events that do not touch the model run beside a request instead of queueing behind it; each runs again
        # after a pending one (always_last), so the page ends showing the latest state.
        free = dict(concurrency_limit=None, show_progress='hidden', trigger_mode='always_last')
        # Both: on an upload the editor's change event may carry no image yet (gradio 6), its upload event does.
        for event in (editor.upload, editor.change):
            event(edited, [editor, mode], [region_view, editor, info], **free)
        mode.change(preview, [editor, mode], region_view, **free)
        loaded = [editor, info, region_view, shown_file]
        medical.upload(upload, medical, [*loaded, dicom_row, slice_index, window, centre, width], **free)
        medical.clear(lambda: upload(None), None, [shown_file, dicom_row, slice_index], **free)
        window.input(pick_window, [medical, window, centre, width], [*loaded, window, centre, width], **free)
        for number in (centre, width):
            number.submit(typed_window, [medical, centre, width], [*loaded, window], **free)
        slice_index.input(pick_slice, [medical, slice_index], loaded, **free)  # while dragging, too
    return app, theme


def _brush(radius: int):
    """The page's brush: one fixed red, `radius` pixels of the image."""
    import gradio as gr
    return gr.Brush(colors=['#ff2828'], color_mode='fixed', default_size=radius)


def check_port(port: int) -> int:
    """--port: a free port on 127.0.0.1, checked before the model loads (gradio's own failure is a traceback)."""
    from medplib_jax.infer.session import ChatError
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
    from medplib_jax.infer.session import ChatError, check_mask_mode
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
