"""One record -> the model's arrays: parse, load the image, masks and regions, tokenise (as the reference's
datasets/LazySupervisedDataset.py `__getitem__` does); a bad record becomes a `Skipped` naming why."""
from __future__ import annotations

import traceback
from typing import Any, Sequence

import numpy as np
from absl import logging

from medplib_jax.data.collate import Padding
from medplib_jax.data.config import DataConfig, ModelShapes
from medplib_jax.data.conversation import (
    ConversationError,
    SequenceTooLongError,
    tokenize_conversation,
    with_image_prefix,
)
from medplib_jax.data.images import (
    ImageError,
    clip_canvas,
    clip_normalize,
    find_image,
    load_image,
    load_mask,
    sam_canvas,
    sam_normalize,
)
from medplib_jax.data.records import Record, RecordError, load_record, where_of
from medplib_jax.data.regions import RegionError, RegionPrompt, regions_to_grids
from medplib_jax.data.skips import Skipped
from medplib_jax.data.sources import RawElement, SourceInfo
from medplib_jax.data.tokenizer import MedPLIBTokenizer


class Preprocessor:
    """`RawElement` + rng -> one example (dict of numpy arrays, variable sequence length) or `Skipped`.

    Every failure becomes a `RecordError` naming file, record and field; with `strict` it is raised, otherwise
    returned as `Skipped(reason)`. Picklable: it runs in grain's worker processes.
    """

    def __init__(self, sources: Sequence[SourceInfo], tokenizer: MedPLIBTokenizer, cfg: DataConfig,
                 shapes: ModelShapes, image_cache: Any = None):
        self.sources, self.tokenizer, self.cfg, self.shapes = sources, tokenizer, cfg, shapes
        self.image_cache = image_cache

    def __call__(self, element: RawElement | Padding, rng: np.random.Generator) -> dict | Skipped | Padding:
        if isinstance(element, Padding):
            return element
        src = self.sources[element.dataset]
        try:
            return self.example(element, rng)
        except RecordError as e:
            if self.cfg.strict:
                raise
            return Skipped(element.dataset, element.index, e.reason, str(e))
        except Exception as e:  # noqa: BLE001 - a bug on one record must not lose a long run; logged in full
            where = where_of(src.path, element.index, line=src.line(element.index))
            error = RecordError(f'{where}: unexpected {type(e).__name__}: {e}', 'error')
            if self.cfg.strict:
                raise error from e
            return Skipped(element.dataset, element.index, 'error', f'{error}\n{traceback.format_exc()}')

    def example(self, element: RawElement, rng: np.random.Generator) -> dict:
        src, shapes = self.sources[element.dataset], self.shapes
        # Files are checked when they are read below, with the right reason.
        rec = load_record(element.payload, source=src.path, index=element.index, image_folder=src.image_folder,
                          line=src.line(element.index), duplicate_of=element.duplicate_of, check_files=False)
        if len(rec.masks) > shapes.max_seg:
            raise RecordError(f'{rec.where}: field conversations: {len(rec.masks)} grounding masks, more than '
                              f'config.model.medplib.max_seg={shapes.max_seg}', 'too_many_seg')
        if len(rec.regions) > shapes.max_regions:
            raise RecordError(f'{rec.where}: field conversations: {len(rec.regions)} regions, more than '
                              f'config.model.medplib.max_regions={shapes.max_regions}', 'too_many_regions')
        clip, sam, sam_size, (h, w) = self._image(rec)
        masks = [self._mask(rec, path, (h, w)) for path in rec.masks]
        prompts = [self._region_prompt(rec, k, r, (h, w)) for k, r in enumerate(rec.regions)]
        grids, region_valid = regions_to_grids(prompts, h, w, shapes.max_regions,
                                               largest_component=self.cfg.largest_component, rng=rng)
        for k in range(len(prompts)):
            if not region_valid[k]:  # the reference keeps it with every label ignored: nothing to learn from
                raise RecordError(f'{rec.where}: field <region> {k}: the region vanishes on the 24x24 grid (thinner '
                                  f'than the 14-pixel step)', 'region')
        turns = [(with_image_prefix(rec.turns[0][0]), rec.turns[0][1]), *rec.turns[1:]]
        try:
            tok = tokenize_conversation(self.tokenizer, turns, num_image_tokens=shapes.num_image_tokens,
                                        max_length=self.cfg.max_length, source=f'{rec.where}: field conversations',
                                        template=self.cfg.template)
        except SequenceTooLongError as e:
            raise RecordError(str(e), 'too_long') from None
        except ConversationError as e:
            raise RecordError(str(e)) from None
        if tok.label_mismatch:  # kept with every label ignored, as in the reference (check-data counts these rows)
            message = (f'{rec.where}: field conversations: tokenization mismatch (rounds {tok.label_mismatch[0]} vs '
                       f'{tok.label_mismatch[1]} tokens), every label ignored')
            if self.cfg.strict:
                raise RecordError(message)
            logging.warning('%s', message)
        if tok.num_seg != len(masks):  # prompts and ground truths pair by order (the reference's `model_forward`)
            raise RecordError(f'{rec.where}: field conversations: {tok.num_seg} <SEG> tokens for {len(masks)} '
                              f'<mask> references')
        if tok.num_regions != len(prompts):
            raise RecordError(f'{rec.where}: field conversations: {tok.num_regions} <region></region> slots for '
                              f'{len(prompts)} region references')
        seg_masks, mask_size = self._seg_canvas(masks, (h, w))
        return dict(input_ids=tok.input_ids, labels=tok.labels, clip_pixels=clip, sam_pixels=sam,
                    sam_size=np.asarray(sam_size, np.int32), image_size=np.asarray((h, w), np.int32),
                    region_grids=grids, region_valid=region_valid, seg_masks=seg_masks,
                    seg_valid=np.arange(shapes.max_seg) < len(masks), mask_size=np.asarray(mask_size, np.int32),
                    label_mismatch=np.bool_(bool(tok.label_mismatch)), dataset_index=np.int32(element.dataset),
                    record_index=np.int32(element.index))

    def _image(self, rec: Record) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[int, int]]:
        """-> normalised CLIP (336, 336, 3) and SAM (256, 256, 3) inputs, SAM's (h', w'), original (H, W)."""
        path = find_image(rec.image)
        cached = self.image_cache.get(path) if self.image_cache is not None else None
        if cached is not None:
            clip, sam, sam_size, size = cached
        else:
            try:
                image = load_image(path)
            except ImageError as e:
                raise RecordError(f'{rec.where}: field image: {e}', 'image') from None
            clip, (sam, sam_size), size = clip_canvas(image), sam_canvas(image), image.shape[:2]
        return clip_normalize(clip), sam_normalize(sam, sam_size), tuple(sam_size), tuple(size)

    def _mask(self, rec: Record, path: str, size: tuple[int, int]) -> np.ndarray:
        try:
            mask = load_mask(path, size)
        except ImageError as e:
            raise RecordError(f'{rec.where}: field <mask>: {e}', 'mask') from None
        if not mask.any():
            raise RecordError(f'{rec.where}: field <mask>: {path}: the mask is empty', 'mask')
        return mask

    def _region_prompt(self, rec: Record, k: int, region: Any, size: tuple[int, int]) -> RegionPrompt:
        """Region k as a mask prompt at the image size (points and boxes drawn, mask files loaded), errors named."""
        try:
            if region.prompt is not None:
                return RegionPrompt('mask', region.prompt.to_mask(*size))
            mask = load_mask(region.path, size)
        except (ImageError, RegionError) as e:
            raise RecordError(f'{rec.where}: field <region> {k}: {e}', 'region') from None
        if not mask.any():
            raise RecordError(f'{rec.where}: field <region> {k}: {region.path}: the free-form region is empty',
                              'region')
        return RegionPrompt('mask', mask)

    def _seg_canvas(self, masks: Sequence[np.ndarray], size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """Ground-truth masks at the original resolution (where the reference computes the mask losses), top-left
        in a (max_seg, C, C) canvas; an image larger than C is scaled down (nearest) to fit, and `mask_size`
        records the size the masks have in the canvas."""
        c = self.cfg.mask_canvas
        h, w = size
        scale = min(1.0, c / max(h, w))
        mh, mw = (h, w) if scale == 1.0 else (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
        out = np.zeros((self.shapes.max_seg, c, c), np.uint8)
        for k, mask in enumerate(masks):
            if (mh, mw) != (h, w):
                rows = np.minimum((np.arange(mh) * h / mh).astype(int), h - 1)
                cols = np.minimum((np.arange(mw) * w / mw).astype(int), w - 1)
                mask = mask[rows][:, cols]
            out[k, :mh, :mw] = mask
        return out, (mh, mw)
