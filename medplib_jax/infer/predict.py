"""The predict API: an image, a question and optional region prompts -> the answer, a `<SEG>` mask at the image's
original size, and on request the expert each generated token was routed to.

    predictor = Predictor.from_params_dir('runs/demo/stage4/final_params')
    p = predictor.predict(load_image('ct.png'), 'Can you segment the liver?')
    p.text, p.mask            # '... <SEG>', (H, W) bool
    predictor.predict(image, 'What is in <region></region>?', regions=[RegionPrompt('box', (40, 30, 90, 80))])

The prompt is the training template (llava_v1) built from the conversation (data/conversation.py `prompt_ids`);
`system='reference_eval'` selects the reference evaluation's system text instead. Images go through the training
preprocessing (CLIP 336 pad, SAM-Med2D 256), regions through the same 24x24 grids. Decoding: infer/generate.py. The
mask: the `<SEG>` state -> T-projector -> SAM-Med2D mask decoder -> 64x64 logits -> the original size through the
mask geometry the losses use (models/masks.py), thresholded at sigmoid 0.1.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.data.conversation import SYSTEMS, prompt_ids
from medplib_jax.data.images import clip_preprocess, load_image, sam_preprocess
from medplib_jax.data.regions import RegionError, RegionPrompt, regions_to_grids
from medplib_jax.data.tokenizer import MedPLIBTokenizer, load_tokenizer, tiny_tokenizer
from medplib_jax.infer.generate import Sampling, generate
from medplib_jax.models.masks import binarize, masks_to_canvas
from medplib_jax.models.medplib import MedPLIBConfig, MedPLIBForCausalLM
from medplib_jax.models.moe import collect_moe_metrics
from medplib_jax.tree import unflatten

MASK_MODES = ('auto', 'always', 'never')
_CANVAS_STEP = 256  # mask canvases are rounded up to this, so few image sizes compile their own program


@dataclasses.dataclass
class Request:
    """One question about one image. `image`: (H, W, 3) uint8 RGB or a file path (PNG, JPEG, DICOM, NIfTI);
    `regions`: prompts filled into the question's `<region></region>` slots, in order; `history`: earlier
    (question, answer) turns of the conversation."""
    image: np.ndarray | str
    question: str
    regions: Sequence[RegionPrompt] = ()
    history: Sequence[tuple[str, str]] = ()


@dataclasses.dataclass
class Prediction:
    """`text`: the answer (up to `</s>`, added tokens such as `<SEG>` kept); `tokens`: its ids (with `</s>` when
    generated); `mask` (H, W) bool and `mask_logits` (H, W) fp32 at the original image size, or None; `has_seg`:
    whether a `<SEG>` was generated (a mask without one is the reference's fallback); `routing` (MoE layers,
    tokens) int: the first-choice expert of each generated token per MoE layer (-1: dropped), with `routing=True`."""
    text: str
    tokens: list[int]
    has_seg: bool
    mask: np.ndarray | None = None
    mask_logits: np.ndarray | None = None
    routing: np.ndarray | None = None


def params_config(path: str) -> dict[str, Any]:
    """The config a params directory was written with (its metadata's `config`), as the parameters are: a hand-off
    (`final_params`, `medplib-jax export`; `merged_lora` in the metadata) has its LoRA folded into the kernels, so
    its model has no adapters (`model.lora.rank` 0) whatever rank the run trained with."""
    from medplib_jax import checkpoint
    meta = checkpoint.params_meta(path)
    try:
        config = dict(meta['config'])
        config['model'] = dict(config['model'])
    except (KeyError, TypeError) as e:
        raise FileNotFoundError(f'{path}: its metadata ({checkpoint.PARAMS_META}) holds no model config '
                                f'({type(e).__name__}: {e})') from None
    if meta.get('merged_lora'):
        config['model']['lora'] = {**dict(config['model'].get('lora') or {}), 'rank': 0}
    return config


class PredictError(ValueError):
    """A request that cannot be answered (bad image, regions that do not fit the question); one line."""


class Predictor:
    """A model, its parameters and its tokenizer, ready to answer. Prompts are left-padded to a multiple of
    `length_step` tokens, so a few programs serve all prompt lengths."""

    def __init__(self, mcfg: MedPLIBConfig, params: Any, tokenizer: MedPLIBTokenizer, *, max_new_tokens: int = 512,
                 sampling: Sampling = Sampling(), system: str = 'train', largest_component: bool = True,
                 length_step: int = 128):
        if system not in SYSTEMS:
            raise ValueError(f'predict: system={system!r}; known: {sorted(SYSTEMS)}')
        if tokenizer.ids.vocab_size != mcfg.llm.vocab_size or tokenizer.ids.seg != mcfg.seg_token_id:
            raise ValueError(f'predict: the tokenizer ({tokenizer.source}: vocab {tokenizer.ids.vocab_size}, <SEG> '
                             f'{tokenizer.ids.seg}) does not fit the model (vocab {mcfg.llm.vocab_size}, <SEG> '
                             f'{mcfg.seg_token_id})')
        self.mcfg, self.params, self.tokenizer = mcfg, params, tokenizer
        self.model = MedPLIBForCausalLM(mcfg.llm, mcfg=mcfg)
        self.max_new_tokens, self.sampling, self.system = max_new_tokens, sampling, SYSTEMS[system]
        self.largest_component, self.length_step = largest_component, length_step
        self.synthetic = False  # weights trained on the synthetic demo data (from_params_dir reads it)
        self._masks = jax.jit(self._mask_logits, static_argnames=('canvas',))
        self._routing = jax.jit(self._route)

    @classmethod
    def from_params_dir(cls, path: str, *, tokenizer: MedPLIBTokenizer | str | None = None,
                        log: Callable[[str], None] | None = None, **kwargs) -> 'Predictor':
        """A params directory (`final_params`, `medplib-jax export`, the converters) with the metadata inside it
        that holds its config: the model is built from that config, never from defaults; the parameters are read
        onto this machine's first device. `tokenizer`: a tokenizer, a folder or 'tiny' instead of the one the
        directory carries (`checkpoint.params_tokenizer`). `log`: progress lines."""
        from medplib_jax import checkpoint
        path = checkpoint.resolve_params_dir(path, 'predict')
        config = params_config(path)
        mcfg = MedPLIBConfig.from_model_config(config['model'])
        if not isinstance(tokenizer, MedPLIBTokenizer):
            source = checkpoint.params_tokenizer(path, tokenizer)
            tokenizer = tiny_tokenizer() if source == 'tiny' else load_tokenizer(source)
        if log:
            log(f'loading the parameters of {path}')
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = unflatten(checkpoint.restore_params(path, lambda _k, _s: one))
        predictor = cls(mcfg, params, tokenizer, **kwargs)
        predictor.synthetic = bool(checkpoint.params_meta(path).get('synthetic_data'))
        return predictor

    # ----------------------------------------------------------------------------------------------------------
    def predict(self, image: np.ndarray | str, question: str, regions: Sequence[RegionPrompt] = (), *,
                mask: str = 'auto', routing: bool = False) -> Prediction:
        """One answer (see `predict_batch`)."""
        return self.predict_batch([Request(image, question, regions)], mask=mask, routing=routing)[0]

    def predict_batch(self, requests: Sequence[Request], *, mask: str = 'auto', routing: bool = False,
                      rng: jax.Array | None = None) -> list[Prediction]:
        """Answers for several requests decoded together (equal to one at a time). `mask`: 'auto' (when a `<SEG>`
        is generated), 'always' (the reference's evaluation: the fallback state when none is) or 'never'."""
        if mask not in MASK_MODES:
            raise ValueError(f'predict: mask={mask!r}; known: {MASK_MODES}')
        inputs = [self._inputs(r) for r in requests]
        length = self.length_step * math.ceil(max(len(x['ids']) for x in inputs) / self.length_step)
        ids = np.zeros((len(inputs), length), np.int32)
        token_mask = np.zeros((len(inputs), length), bool)
        for i, x in enumerate(inputs):
            ids[i, length - len(x['ids']):] = x['ids']
            token_mask[i, length - len(x['ids']):] = True
        prompt = {'input_ids': jnp.asarray(ids), 'token_mask': jnp.asarray(token_mask),
                  'clip_pixels': jnp.asarray(np.stack([x['clip'] for x in inputs])),
                  'region_grids': jnp.asarray(np.stack([x['grids'] for x in inputs]))}
        out = jax.device_get(generate(self.model, self.params, prompt, max_new_tokens=self.max_new_tokens,
                                      eos_id=self.tokenizer.ids.eos, seg_id=self.mcfg.seg_token_id,
                                      sampling=self.sampling, rng=rng))
        predictions = []
        for i, x in enumerate(inputs):
            n = int(out['lengths'][i])
            tokens = [int(t) for t in out['tokens'][i, :n]]
            text_ids = tokens[:-1] if tokens and tokens[-1] == self.tokenizer.ids.eos else tokens
            predictions.append(Prediction(self.tokenizer.decode(text_ids).strip(), tokens, bool(out['has_seg'][i])))
        wanted = [i for i, p in enumerate(predictions) if mask == 'always' or (mask == 'auto' and p.has_seg)]
        for i in wanted:
            logits = self.mask_logits(out['seg_hidden'][i], inputs[i]['sam'], inputs[i]['sam_size'],
                                      inputs[i]['size'])
            predictions[i].mask_logits = logits
            predictions[i].mask = np.asarray(binarize(logits, self.mcfg.mask_threshold))
        if routing and self.mcfg.llm.moe_layers:
            for i, p in enumerate(predictions):
                p.routing = self.routing(ids[i:i + 1], token_mask[i:i + 1], prompt['clip_pixels'][i:i + 1],
                                         prompt['region_grids'][i:i + 1], p.tokens)
        return predictions

    # ----------------------------------------------------------------------------------------------------------
    def _inputs(self, request: Request) -> dict[str, Any]:
        image = request.image
        if isinstance(image, (str, os.PathLike)):
            image = load_image(os.fspath(image))
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise PredictError(f'predict: the image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}')
        h, w = image.shape[:2]
        slots = request.question.count('<region></region>')
        if slots != len(request.regions):
            raise PredictError(f'predict: the question marks {slots} regions with <region></region> but '
                               f'{len(request.regions)} region prompts were given')
        try:
            grids, _ = regions_to_grids(list(request.regions), h, w, self.mcfg.max_regions,
                                        largest_component=self.largest_component)
        except RegionError as e:
            raise PredictError(f'predict: {e}') from None
        sam, sam_size = sam_preprocess(image)
        ids = prompt_ids(self.tokenizer, request.history, request.question,
                         num_image_tokens=self.mcfg.num_image_tokens, system=self.system)
        return dict(ids=ids, clip=clip_preprocess(image), sam=sam, sam_size=sam_size, size=(h, w), grids=grids)

    def mask_logits(self, seg_hidden: np.ndarray, sam_pixels: np.ndarray, sam_size: tuple[int, int],
                    size: tuple[int, int]) -> np.ndarray:
        """One `<SEG>` state (D,) -> mask logits (H, W) at the original size."""
        canvas = tuple(_CANVAS_STEP * math.ceil(s / _CANVAS_STEP) for s in size)
        logits = self._masks(self.params, jnp.asarray(seg_hidden)[None], jnp.asarray(sam_pixels)[None],
                             jnp.asarray(sam_size, jnp.int32)[None], jnp.asarray(size, jnp.int32)[None], canvas=canvas)
        return np.asarray(logits[0, :size[0], :size[1]])

    def _mask_logits(self, params, seg_hidden, sam_pixels, sam_size, size, canvas):
        low_res, _ = self.model.apply({'params': params}, seg_hidden[:, None], sam_pixels,
                                      method=MedPLIBForCausalLM.seg_masks)
        out, _ = masks_to_canvas(low_res[:, 0], sam_size, size, canvas, self.mcfg.postprocess)
        return out

    def routing(self, ids: np.ndarray, token_mask: np.ndarray, clip_pixels: jax.Array, region_grids: jax.Array,
                tokens: list[int]) -> np.ndarray:
        """(MoE layers, generated tokens) first-choice expert of each generated token (-1 where it was dropped),
        from one teacher-forced pass over prompt + answer (evaluation mode, as decoding routes)."""
        full = np.concatenate([ids, np.asarray([tokens], np.int32)], axis=1)
        mask = np.concatenate([token_mask, np.ones((1, len(tokens)), bool)], axis=1)
        # token n was produced at position t - 1 + n and is the input at position t + n: its routing is there
        return self._first_choice(full, mask, clip_pixels, region_grids)[:, ids.shape[1]:]

    def prompt_routing(self, request: Request, answer: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids (T,), first-choice expert (MoE layers, T), -1 where dropped) of one request's prompt, as its
        prefill routes it (evaluation mode), followed by the `answer` token ids teacher-forced (as decoding would
        route them had it produced them). Image positions hold the image placeholder id."""
        if not self.mcfg.llm.moe_layers:
            raise ValueError('predict: prompt_routing needs a MoE model (config.model.moe_layers is empty)')
        x = self._inputs(request)
        ids = np.asarray([*x['ids'], *answer], np.int32)[None]
        return ids[0], self._first_choice(ids, np.ones(ids.shape, bool), jnp.asarray(x['clip'])[None],
                                          jnp.asarray(x['grids'])[None])

    def _first_choice(self, ids: np.ndarray, token_mask: np.ndarray, clip_pixels: jax.Array,
                      region_grids: jax.Array) -> np.ndarray:
        """(MoE layers, T) first-choice expert at every position of one sequence (1, T), -1 where dropped."""
        expert, slots = jax.device_get(self._routing(self.params, jnp.asarray(ids), jnp.asarray(token_mask),
                                                     clip_pixels, region_grids))
        return np.where(slots[:, 0] > 0, expert[:, 0], -1)

    def _route(self, params, ids, mask, clip_pixels, region_grids):
        _, state = self.model.apply({'params': params}, ids, clip_pixels, region_grids=region_grids, token_mask=mask,
                                    compute_masks=False, method=MedPLIBForCausalLM.forward,
                                    mutable=['intermediates'])
        m = collect_moe_metrics(state['intermediates'])
        return m['token_expert'], m['token_slots']
