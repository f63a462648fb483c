"""`medplib-jax chat`: ask a params directory's model about one image from the command line.

    medplib-jax chat --checkpoint=runs/demo/stage4 --image=ct.dcm --window=40,400 "Can you segment the liver?"
    medplib-jax chat --checkpoint=DIR --image=scan.png --box=40,30,120,90 "What is in <region></region>?"
    medplib-jax chat --checkpoint=DIR --image=brain.nii.gz --slice=12        # no question: one per stdin line

Images: PNG / JPEG (decoded as the reference decodes them), DICOM (`.dcm`, windowed: `--window=C,W`, else the file's
own window, the modality preset or the 0.5-99.5 percentile range), NIfTI (`.nii`, `.nii.gz`; `--slice` along the
last axis, the middle one by default). Regions (as the reference's demo draws them, gradio_web_server.py
`generate_mask_for_feature`): `--point=x,y` (a 41x41 square), `--box=x0,y0,x1,y1` (inclusive pixel corners; without the
demo's row / column mix-up), `--mask=FILE` (a PNG of the image's size, non-zero = inside). A question without
`<region></region>` gets one appended after a space, as the demo does when its text lacks `<region>`
(gradio_web_server.py `format_region_prompt`: "... <region></region> ASSISTANT:"); the demo's shorthand `<region>` is
accepted too. Like the demo's worker, regions skip the dataset's largest-component step (every drawn part counts).

A mask (`--mask_mode=auto`: when the answer holds `<SEG>`; `always`: the reference evaluation's fallback state when
it does not; `never`) is written as an overlay PNG, `--out` or `<image name>_overlay.png` in the current directory
(in the interactive mode `_<n>` is added for the n-th question), with the binary mask beside it (`..._mask.png`);
the path is printed. `--routing` prints, for a MoE model, the first-choice expert of every answer token in each MoE
layer. Decoding is greedy (the reference's evaluation) unless `--temperature` is set.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence, TextIO

import numpy as np
from PIL import Image

from medplib_jax.constants import DEMO_NOTICE
from medplib_jax.infer.session import (
    ChatError,
    build_predictor,
    check_mask_mode,
    load_chat_image,
    region_from_flags,
    token_texts,
    with_region_slots,
)


def routing_line(texts: Sequence[str], routing: np.ndarray) -> str:
    """'routing: token[e e ...] ...': each answer token with its first-choice expert in every MoE layer, first
    layer first ('x': dropped, passed through)."""
    layers = ''.join
    cells = [f'{text}[{layers("x" if e < 0 else str(int(e)) for e in routing[:, k])}]'
             for k, text in enumerate(texts)]
    return f'routing ({routing.shape[0]} MoE layers, expert per layer): ' + ' '.join(cells)


def overlay_paths(out: str | None, image_path: str, index: int | None) -> tuple[str, str]:
    """(overlay PNG, mask PNG): `out` or `<image name>_overlay.png` in the current directory; `_<index>` is added
    before the suffix in the interactive mode."""
    if not out:
        name = os.path.basename(image_path)
        name = name[:-len('.nii.gz')] if name.lower().endswith('.nii.gz') else os.path.splitext(name)[0]
        out = f'{name}_overlay.png'
    stem, suffix = os.path.splitext(out)
    stem = f'{stem}_{index}' if index is not None else stem
    return stem + (suffix or '.png'), stem + '_mask.png'


def run_chat(checkpoint: str, image_path: str, question: str | None, *, point: str | None = None,
             box: str | None = None, mask: str | None = None, slice_index: int | None = None,
             window: str | None = None, out: str | None = None, mask_mode: str = 'auto', routing: bool = False,
             max_new_tokens: int | None = None, temperature: float | None = None, tokenizer: str | None = None,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             report: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> int:
    """Answers `question`, or every non-empty stdin line when it is None (the model loaded once). Flag, file and
    region errors raise a one-line ValueError / FileNotFoundError before the model loads; in the interactive mode a
    question that cannot be answered is reported through `report` and the next one read. Returns the exit status:
    0, or 2 when an interactive question failed."""
    from medplib_jax import checkpoint as ckpt
    from medplib_jax.infer.overlay import overlay
    if not checkpoint:
        raise ChatError('set --checkpoint=DIR (a run directory or a params directory)')
    if not image_path:
        raise ChatError('set --image=FILE (PNG, JPEG, DICOM .dcm or NIfTI .nii / .nii.gz)')
    check_mask_mode(mask_mode)
    if question is not None and not question.strip():
        raise ChatError('the question is empty')
    ckpt.resolve_params_dir(checkpoint, '--checkpoint')  # a missing checkpoint: one line, before anything loads
    image = load_chat_image(image_path, slice_index=slice_index, window=window)
    regions = region_from_flags(point, box, mask, image.shape[:2])
    predictor = build_predictor(checkpoint, max_new_tokens=max_new_tokens, temperature=temperature,
                                tokenizer=tokenizer, log=report)
    if predictor.synthetic:
        report(f'note: {DEMO_NOTICE}')
    if routing and not predictor.mcfg.llm.moe_layers:
        report('--routing: this model has no MoE layers; no routing to print')
    interactive = question is None
    if interactive and stdin.isatty():
        report('one question per line; end with Ctrl-D')
    failed, asked = False, 0
    for line in ([question] if not interactive else stdin):
        line = line.strip()
        if not line:
            continue
        asked += 1
        text = with_region_slots(line, len(regions))
        if asked == 1:  # the first answer compiles the model's programs (or loads them from the compilation cache)
            report('answering (the first answer of a run prepares the model\'s programs)')
        try:
            p = predictor.predict(image, text, regions, mask=mask_mode, routing=routing)
        except ValueError as e:  # PredictError and the like: a question that does not fit
            if not interactive:
                raise
            report(f'medplib-jax chat: {str(e).splitlines()[0]}')
            failed = True
            continue
        print(p.text, file=stdout)
        if p.routing is not None:
            print(routing_line(token_texts(predictor.tokenizer, p.tokens), p.routing), file=stdout)
        if p.mask is not None:
            picture, mask_png = overlay_paths(out, image_path, asked if interactive else None)
            overlay(image, p.mask, question=text, answer=p.text, title=os.path.basename(image_path)).save(picture)
            Image.fromarray(p.mask.astype(np.uint8) * 255).save(mask_png)
            source = '<SEG>' if p.has_seg else 'no <SEG>: the fallback state'
            print(f'mask: {int(p.mask.sum())} of {p.mask.size} pixels ({source}); overlay {picture}, mask {mask_png}',
                  file=stdout)
        stdout.flush()
    return 2 if failed else 0
