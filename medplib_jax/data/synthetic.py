"""Synthetic MeCoVQA-like data: real PNG images and masks and JSON files in the reference's formats (as its
datasets/LazySupervisedDataset.py reads them).

Each image is a "modality" (CT-, MR-, X-ray- or dermoscopy-like intensity statistics and texture) holding one to
three labelled shapes (organs / lesions) that do not overlap, each class with its own look (LOOKS). From it come
a complex-VQA record and a where-question per shape (MeCoVQA-C: "Where is the {name}?" -> the organ and the
quadrant it lies in), region-VQA records (MeCoVQA-R: a mask file, and this project's `box:` / `point:`
extension), a grounding record per shape (MeCoVQA-G: `<SEG><mask>PATH</mask>`) and a closed question whose
answer follows from the image (OmniMedVQA-style: the modality, four options). File names follow SA-Med2D:
`images/<modality>_<sub>--<dataset>--<case>--<slice>.png`, masks `masks/<image stem>--<class id>_<instance>.png`
with 0/255 values. Seeded and deterministic. Beside them, `tokenizer/`: the demo tokenizer (`write_tokenizer`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from medplib_jax.constants import SYNTHETIC_MARKER
from medplib_jax.data.tokenizer import ADDED_TOKENS, tiny_base_vocab, tiny_model_proto

# modality -> (file-name prefix, background, tissue, object classes)
MODALITIES = {
    'ct': ('ct_00', 20, 90, ('liver', 'kidney', 'spleen', 'tumor')),
    'mr': ('mr_00', 35, 140, ('brain', 'ventricle', 'lesion')),
    'x_ray': ('x_ray', 60, 170, ('lung', 'heart', 'nodule')),
    'dermoscopy': ('dermoscopy_00', 200, 150, ('lesion', 'nevus')),
}
# (modality, class) -> (intensity offset from the tissue, ellipse or rectangle, size as a fraction of the image's
# side (min, max)). Each class looks the same in every image, as an organ does: what a question names can be
# found by looking (with random looks, "segment the liver" among two alike shapes would be a coin toss).
LOOKS = {
    ('ct', 'liver'): (90, True, (0.25, 0.34)), ('ct', 'kidney'): (45, True, (0.12, 0.18)),
    ('ct', 'spleen'): (-55, False, (0.15, 0.24)), ('ct', 'tumor'): (140, True, (0.10, 0.15)),
    ('mr', 'brain'): (-70, True, (0.26, 0.34)), ('mr', 'ventricle'): (-110, False, (0.10, 0.16)),
    ('mr', 'lesion'): (105, True, (0.10, 0.18)),
    ('x_ray', 'lung'): (-95, True, (0.22, 0.32)), ('x_ray', 'heart'): (60, False, (0.15, 0.22)),
    ('x_ray', 'nodule'): (-45, True, (0.09, 0.14)),
    ('dermoscopy', 'lesion'): (-95, True, (0.18, 0.30)), ('dermoscopy', 'nevus'): (-45, False, (0.10, 0.16)),
}
MODALITY_OPTIONS = ('CT', 'MR', 'X-ray', 'dermoscopy')  # the closed question's choices (chance 1 / 4)
SIZES = ((192, 192), (160, 256), (256, 176))  # square and non-square, small enough for CPU
CLASS_IDS = {name: i + 1 for i, name in enumerate(sorted({c for m in MODALITIES.values() for c in m[3]}))}
# The records' texts ({...}: filled per record).
COMPLEX_Q = '<image>\nWhat can you interpret from this image?'
COMPLEX_A = 'This is a {modality} image showing the {names}.'  # names joined by ' and the '
REGION_Q = '<image>\nCan you describe what is seen at the area <region>{ref}</region>?'
REGION_A = 'The area shows the {name}, which appears {contrast} than the surrounding tissue.'
CONTRASTS = ('brighter', 'darker')
GROUNDING_Q = '<image>\nCould you segment out the {name} in this image?'
# A where-question per shape (in the complex file): its answer starts with the organ asked, predicted at the
# position that also predicts a grounding answer's `<SEG>` (the `:` of `ASSISTANT:`), so the text stages teach
# the LLM to bring the question's organ there; without it the mask cannot depend on the organ asked (the demo's
# tiny LLM never learns that route from the mask loss alone: stage III trains per-position FFN LoRA only).
WHERE_Q = '<image>\nWhere is the {name} in this image?'
WHERE_A = '{name}, in the {vertical} {horizontal} part of the image.'
VERTICAL, HORIZONTAL = ('upper', 'lower'), ('left', 'right')  # the box centre against the image centre
CLOSED_Q = '<image>\nWhich imaging modality is this? Options: {options}'
TOKENIZER = 'tokenizer'  # the demo tokenizer's folder under the data folder (`write_tokenizer`)
FILES = {'complex': 'MeCoVQA_Complex_VQA_{split}.json', 'region': 'MeCoVQA_Region_VQA_{split}.json',
         'grounding': 'MeCoVQA_Grounding_{split}.json', 'closed': 'OmniMedVQA_closed_{split}.json'}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    ellipse: bool
    bright: bool


def _draw_image(modality: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, list[Shape],
                                                                                          list[np.ndarray]]:
    h, w = size
    prefix, background, tissue, classes = MODALITIES[modality]
    img = np.full((h, w), float(background))
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 <= 1
    if modality == 'x_ray':  # a projection through the chest: the body fills the frame (no air around a slice)
        body[:] = True
    img[body] = tissue
    shapes, masks = [], []
    names = rng.choice(classes, size=int(rng.integers(1, min(3, len(classes)) + 1)), replace=False)
    taken = np.zeros((h, w), bool)
    for name in names:
        offset, ellipse, (lo, hi) = LOOKS[modality, str(name)]
        for _ in range(50):  # shapes do not overlap: each mask is exactly what shows its class
            bw, bh = (int(round(side * rng.uniform(lo, hi))) for side in (w, h))
            x0, y0 = int(rng.integers(w // 8, w - w // 8 - bw)), int(rng.integers(h // 8, h - h // 8 - bh))
            if not taken[max(0, y0 - 3):y0 + bh + 4, max(0, x0 - 3):x0 + bw + 4].any():
                break
        else:
            continue
        shape = Shape(str(name), (x0, y0, x0 + bw, y0 + bh), ellipse, offset > 0)
        canvas = Image.new('L', (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        (draw.ellipse if shape.ellipse else draw.rectangle)(shape.box, fill=255)
        mask = np.asarray(canvas)
        img[mask > 0] = tissue + offset
        taken[y0:y0 + bh + 1, x0:x0 + bw + 1] = True
        shapes.append(shape)
        masks.append(mask)
    smooth = 2 if modality == 'mr' else 1
    noise = rng.normal(0, 12 if modality == 'ct' else 6, size=(h // smooth + 1, w // smooth + 1))
    img = img + np.kron(noise, np.ones((smooth, smooth)))[:h, :w]
    if modality == 'x_ray':
        img = img + np.linspace(-20, 20, h)[:, None]
    gray = np.clip(img, 0, 255).astype(np.uint8)
    if modality == 'dermoscopy':  # skin-coloured RGB, brownish lesions
        rgb = np.stack([gray, (gray * 0.8).astype(np.uint8), (gray * 0.65).astype(np.uint8)], -1)
    else:
        rgb = np.repeat(gray[..., None], 3, -1)
    return rgb, shapes, masks


MARKER = SYNTHETIC_MARKER  # marks a folder this generator wrote, so it may write there again


def is_synthetic(folder: str) -> bool:
    """Whether `folder` was written by `make_demo_data` (its records and images are synthetic shapes)."""
    return bool(folder) and os.path.isfile(os.path.join(folder, MARKER))


def vocabulary() -> tuple[str, ...]:
    """Every word the records and the conversation template can hold (templates, system prompts, roles, class
    and modality names, options), in a fixed order: the demo tokenizer's word pieces."""
    from medplib_jax.data.conversation import ROLES, SYSTEMS
    text = ' '.join([COMPLEX_Q, COMPLEX_A, REGION_Q, REGION_A, GROUNDING_Q, WHERE_Q, WHERE_A, *VERTICAL,
                     *HORIZONTAL, CLOSED_Q, *CONTRASTS, *ROLES,
                     *SYSTEMS.values(), *MODALITY_OPTIONS, *(m.replace('_', '-') for m in MODALITIES),
                     *(c for m in MODALITIES.values() for c in m[3])])
    text = re.sub(r'<[^>]*>|\{[^}]*\}', ' ', text)  # tags and placeholders are not words
    return tuple(dict.fromkeys(re.findall(r"[A-Za-z][A-Za-z'-]*", text)))


def write_tokenizer(folder: str) -> str:
    """Writes the demo tokenizer (the tiny tokenizer plus `vocabulary()` as whole-word pieces) as a LLaMA-style
    tokenizer folder (`tokenizer.model`); returns the folder. With it an answer such as "dermoscopy" is one token
    instead of ten, so the tiny model learns the synthetic answers in the demo's few hundred steps."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'tokenizer.model'), 'wb') as f:
        f.write(tiny_model_proto(vocabulary()))
    return folder


def demo_vocab_size() -> int:
    """The model vocab that fits the demo tokenizer (its base vocab + MedPLIB's 267 added tokens)."""
    return tiny_base_vocab(vocabulary()) + len(ADDED_TOKENS)


def make_demo_data(out: str, num_images: int = 60, seed: int = 0, test_fraction: float = 0.2) -> dict[str, Any]:
    """Writes images, masks and the JSON files under `out`; returns {file name: record count}. Refuses to write
    into a folder holding any of its JSON names that it did not write (MeCoVQA's own files share two of them)."""
    names = [FILES[kind].format(split=split) for kind in FILES for split in ('train', 'test')]
    taken = [n for n in names if os.path.exists(os.path.join(out, n))]
    if taken and not os.path.exists(os.path.join(out, MARKER)):
        raise FileExistsError(f'{out}: holds {taken[0]}, not written by make-demo-data; refusing to overwrite it '
                              f'(choose another folder)')
    rng = np.random.default_rng(seed)
    period = round(1 / test_fraction) if test_fraction > 0 else 0
    os.makedirs(os.path.join(out, 'images'), exist_ok=True)
    open(os.path.join(out, MARKER), 'w').close()
    os.makedirs(os.path.join(out, 'masks'), exist_ok=True)
    records: dict[str, dict[str, list]] = {kind: {'train': [], 'test': []} for kind in FILES}
    modalities = list(MODALITIES)
    for i in range(num_images):
        modality = modalities[i % len(modalities)]
        prefix = MODALITIES[modality][0]
        size = SIZES[int(rng.integers(len(SIZES)))]
        rgb, shapes, masks = _draw_image(modality, size, rng)
        stem = f'{prefix}--Synth{modality.title().replace("_", "")}--case_{i:05d}--' + \
               ('2d_none' if modality in ('x_ray', 'dermoscopy') else f'z_{int(rng.integers(300)):04d}')
        image = f'images/{stem}.png'
        Image.fromarray(rgb).save(os.path.join(out, image))
        mask_paths = []
        for k, (shape, mask) in enumerate(zip(shapes, masks)):
            path = f'masks/{stem}--{CLASS_IDS[shape.name]:04d}_{k:03d}.png'
            Image.fromarray(mask).save(os.path.join(out, path))
            mask_paths.append(path)
        # Every period-th image is held out (not a random draw): even a small set has test records of each kind.
        split = 'test' if period and i % period == period - 1 else 'train'
        names = [s.name for s in shapes]
        modality_text = modality.replace('_', '-')
        conv = lambda q, a: [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]  # noqa: E731
        records['complex'][split].append({
            'id': f'c{i}', 'image': image, 'answer_type': 'open', 'conversations': conv(
                COMPLEX_Q, COMPLEX_A.format(modality=modality_text, names=' and the '.join(names)))})
        h, w = rgb.shape[:2]
        for k, shape in enumerate(shapes):
            x0, y0, x1, y1 = shape.box
            records['complex'][split].append({
                'id': f'w{i}_{k}', 'image': image, 'answer_type': 'open', 'conversations': conv(
                    WHERE_Q.format(name=shape.name), WHERE_A.format(
                        name=shape.name, vertical=VERTICAL[(y0 + y1) / 2 >= h / 2],
                        horizontal=HORIZONTAL[(x0 + x1) / 2 >= w / 2]))})
        s, mp = shapes[0], mask_paths[0]
        x0, y0, x1, y1 = s.box
        for j, ref in enumerate((mp, f'box:{x0},{y0},{x1},{y1}', f'point:{(x0 + x1) // 2},{(y0 + y1) // 2}')):
            records['region'][split].append({
                'id': f'r{i}_{j}', 'image': image, 'answer_type': 'open', 'conversations': conv(
                    REGION_Q.format(ref=ref),
                    REGION_A.format(name=s.name, contrast=CONTRASTS[0] if s.bright else CONTRASTS[1]))})
        for k, (shape, path) in enumerate(zip(shapes, mask_paths)):  # one grounding question per shape
            records['grounding'][split].append({
                'id': f'g{i}' if k == 0 else f'g{i}_{k}', 'image': image, 'conversations': conv(
                    GROUNDING_Q.format(name=shape.name), f'<SEG><mask>{path}</mask>')})
        options = [str(o) for o in rng.permutation(MODALITY_OPTIONS)]  # OmniMedVQA-style: answer = option text
        answer = MODALITY_OPTIONS[modalities.index(modality)]
        records['closed'][split].append({
            'id': f'o{i}', 'image': image, 'answer_type': 'closed', 'modality_type': modality_text,
            'options': options,
            'conversations': conv(CLOSED_Q.format(options=', '.join(options)), answer)})
    write_tokenizer(os.path.join(out, TOKENIZER))
    counts = {}
    for kind, splits in records.items():
        for split, recs in splits.items():
            name = FILES[kind].format(split=split)
            with open(os.path.join(out, name), 'w') as f:
                json.dump(recs, f, indent=1)
            counts[name] = len(recs)
    return counts
