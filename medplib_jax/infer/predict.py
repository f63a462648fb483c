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

A batch takes two programs and no host round trip in between: one decodes every request and, in the same program,
runs the SAM image encoder once per image and the mask decoder on each request's `<SEG>` state (the state never
leaves the device); the other brings the 64x64 logits of the whole batch to one canvas and thresholds them there.
The routing comes from the decoding steps themselves (generate's `routing`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medplib_jax.constants import CHAT_MAX_NEW_TOKENS
from medplib_jax.data.conversation import SYSTEMS, prompt_ids
from medplib_jax.data.images import clip_preprocess, load_image, sam_preprocess
from medplib_jax.data.regions import RegionError, RegionPrompt, regions_to_grids
from medplib_jax.data.tokenizer import MedPLIBTokenizer, load_tokenizer, tiny_tokenizer
from medplib_jax.infer.generate import Sampling, generate
from medplib_jax.models.masks import LOW_RES, binarize, masks_to_canvas
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

    def __init__(self, mcfg: MedPLIBConfig, params: Any, tokenizer: MedPLIBTokenizer, *,
                 max_new_tokens: int = CHAT_MAX_NEW_TOKENS, sampling: Sampling = Sampling(), system: str = 'train',
                 largest_component: bool = True, length_step: int = 128):
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
        length = self._padded_length(max(len(x['ids']) for x in inputs))
        ids = np.zeros((len(inputs), length), np.int32)
        token_mask = np.zeros((len(inputs), length), bool)
        for i, x in enumerate(inputs):
            ids[i, length - len(x['ids']):] = x['ids']
            token_mask[i, length - len(x['ids']):] = True
        prompt = {'input_ids': jnp.asarray(ids), 'token_mask': jnp.asarray(token_mask),
                  'clip_pixels': jnp.asarray(np.stack([x['clip'] for x in inputs])),
                  'region_grids': jnp.asarray(np.stack([x['grids'] for x in inputs]))}
        sam = None if mask == 'never' else jnp.asarray(np.stack([x['sam'] for x in inputs]))
        decoded = decode_and_segment(self.model, self.params, prompt, sam, rng, max_new_tokens=self.max_new_tokens,
                                     eos_id=self.tokenizer.ids.eos, sampling=self.sampling, mask=mask)
        keys = ('tokens', 'lengths', 'has_seg') + (('routing',) if routing and 'routing' in decoded else ())
        out = jax.device_get({k: decoded[k] for k in keys})
        predictions = []
        for i in range(len(inputs)):
            n = int(out['lengths'][i])
            tokens = [int(t) for t in out['tokens'][i, :n]]
            text_ids = tokens[:-1] if tokens and tokens[-1] == self.tokenizer.ids.eos else tokens
            predictions.append(Prediction(self.tokenizer.decode(text_ids).strip(), tokens, bool(out['has_seg'][i])))
            if 'routing' in out:
                predictions[i].routing = out['routing'][:, i, :n].copy()
        wanted = [i for i, p in enumerate(predictions) if mask == 'always' or (mask == 'auto' and p.has_seg)]
        if wanted:
            sizes = [x['size'] for x in inputs]
            logits, binary = jax.device_get(self._canvas(
                decoded['low_res'], [x['sam_size'] for x in inputs], sizes))
            for i in wanted:
                h, w = sizes[i]
                # copies: a prediction does not keep its whole batch's canvas alive
                predictions[i].mask_logits, predictions[i].mask = logits[i, :h, :w].copy(), binary[i, :h, :w].copy()
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
        low_res = seg_low_res(self.model, self.params, jnp.asarray(seg_hidden)[None], jnp.asarray(sam_pixels)[None])
        logits, _ = self._canvas(low_res, [sam_size], [size])
        return np.asarray(logits[0, :size[0], :size[1]])

    def _canvas(self, low_res: jax.Array, sam_sizes: Sequence[tuple[int, int]],
                sizes: Sequence[tuple[int, int]]) -> tuple[jax.Array, jax.Array]:
        canvas = tuple(_CANVAS_STEP * math.ceil(max(s[d] for s in sizes) / _CANVAS_STEP) for d in (0, 1))
        return masks_on_canvas(low_res, jnp.asarray(sam_sizes, jnp.int32), jnp.asarray(sizes, jnp.int32),
                               canvas=canvas, mode=self.mcfg.postprocess, threshold=self.mcfg.mask_threshold)

    def prompt_routing(self, request: Request, answer: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(ids (T,), first-choice expert (MoE layers, T), -1 where dropped) of one request's prompt, as its
        prefill routes it (evaluation mode), followed by the `answer` token ids teacher-forced (as decoding would
        route them had it produced them). Image positions hold the image placeholder id."""
        if not self.mcfg.llm.moe_layers:
            raise ValueError('predict: prompt_routing needs a MoE model (config.model.moe_layers is empty)')
        x = self._inputs(request)
        ids = np.asarray([*x['ids'], *answer], np.int32)
        # Right-padded to a multiple of `length_step` (a few programs for every length): causal attention keeps
        # the padding out of the real positions, and evaluation routing drops no token (its capacity covers the
        # group), so the real positions route as the sequence alone does.
        n = len(ids)
        length = self._padded_length(n)
        padded, token_mask = np.zeros((1, length), np.int32), np.zeros((1, length), bool)
        padded[0, :n], token_mask[0, :n] = ids, True
        experts = self._first_choice(padded, token_mask, jnp.asarray(x['clip'])[None], jnp.asarray(x['grids'])[None])
        return ids, experts[:, :n]

    def _padded_length(self, n: int) -> int:
        """The program length a sequence of `n` tokens is padded to: the next multiple of `length_step`."""
        return self.length_step * math.ceil(n / self.length_step)

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



# Module-level programs with the model as a static argument (as `generate`): the evaluators' predictors, one per
# evaluator over the same model, share their compiled programs.
@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'eos_id', 'sampling', 'mask'))
def decode_and_segment(model: MedPLIBForCausalLM, params: Any, prompt: dict[str, jax.Array],
                       sam_pixels: jax.Array | None, rng: jax.Array | None, *, max_new_tokens: int, eos_id: int,
                       sampling: Sampling, mask: str) -> dict[str, jax.Array]:
    """`generate`, plus with `mask` other than 'never' the 64x64 mask logits `low_res` (B, 64, 64) of every
    request's `<SEG>` state, in the same program (for 'auto' only when some request generated a `<SEG>`, else
    zeros)."""
    out = generate(model, params, prompt, max_new_tokens=max_new_tokens, eos_id=eos_id,
                   seg_id=model.mcfg.seg_token_id, sampling=sampling, rng=rng)
    if mask == 'never':
        return out

    def segment():
        return seg_low_res(model, params, out['seg_hidden'], sam_pixels)

    if mask == 'always':
        out['low_res'] = segment()
    else:  # the SAM image encoder is most of a mask's cost: skipped when no request needs it
        zeros = jnp.zeros((sam_pixels.shape[0], LOW_RES, LOW_RES), jnp.float32)
        out['low_res'] = jax.lax.cond(out['has_seg'].any(), segment, lambda: zeros)
    return out


@functools.partial(jax.jit, static_argnames=('model',))
def seg_low_res(model: MedPLIBForCausalLM, params: Any, seg_hidden: jax.Array, sam_pixels: jax.Array) -> jax.Array:
    """`<SEG>` states (B, D) + SAM inputs (B, 256, 256, 3) -> 64x64 mask logits (B, 64, 64): each request's image
    embedded once, the whole batch in one call."""
    low_res, _ = model.apply({'params': params}, seg_hidden[:, None], sam_pixels, method=MedPLIBForCausalLM.seg_masks)
    return low_res[:, 0]


@functools.partial(jax.jit, static_argnames=('canvas', 'mode', 'threshold'))
def masks_on_canvas(low_res: jax.Array, sam_size: jax.Array, size: jax.Array, *, canvas: tuple[int, int], mode: str,
                    threshold: float) -> tuple[jax.Array, jax.Array]:
    """(B, 64, 64) logits -> (logits (B, Hc, Wc), masks (B, Hc, Wc) bool), each at its image's size, top-left:
    thresholded here, where the logits are, not after a trip to the host."""
    logits, _ = masks_to_canvas(low_res, sam_size, size, canvas, mode)
    return logits, binarize(logits, threshold)
