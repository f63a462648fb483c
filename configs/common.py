"""Shared config pieces: model sizes, mesh, dtypes, logical-axis rules.

Every entry point takes `--config=configs/<file>.py[:arg]` and any field can be overridden from the command line
with `--config.a.b=value` (ml_collections `config_flags`). The arg string is big_vision-style, a comma-separated
list of `key=value` (e.g. `model=tiny,scan=True`).
"""
from __future__ import annotations

import dataclasses

import ml_collections as mlc

from medplib_jax.axis_rules import LOGICAL_AXIS_RULES
from medplib_jax.data.config import DataConfig
from medplib_jax.data.synthetic import FILES as DEMO_FILES  # the synthetic set's files by kind
from medplib_jax.data.tokenizer import ADDED_TOKENS
from medplib_jax.eval.config import REFERENCE_TEST_FILES, EvalSettings
from medplib_jax.models.config import (
    LlamaConfig,
    LoRAConfig,
    MedPLIBConfig,
    MoEConfig,
    SamDecoderConfig,
    SamImageEncoderConfig,
)
from medplib_jax.train.config import CheckpointConfig, TrainConfig

# LLaMA decoder sizes. `llama7b` is LLaVA-v1.5-7B (LLaMA-2-7B architecture) with the MedPLIB vocab of 32267
# (32000 + the reference's 267 `ADD_OTHERS_TOKENS`); tiny = the offline tiny tokenizer's 309 + 267.
LLM_SIZES = {
    'tiny': dict(vocab_size=576, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=1024),
    'llama7b': dict(vocab_size=32267, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                    num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=4096),
}

# CLIP ViT vision tower sizes. `clip_l336` is openai/clip-vit-large-patch14-336 (the reference's clip_encoder.py).
VISION_SIZES = {
    # tiny keeps the 336/14 geometry: the region encoder works on the reference's 24x24 patch grid.
    'tiny': dict(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=3,
                 num_heads=4, layer_norm_eps=1e-5),
    'clip_l336': dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24,
                      num_heads=16, layer_norm_eps=1e-5),
}

# SAM-Med2D sizes, as overrides of the config dataclasses' defaults, which are sam-med2d_b.pth's (ViT-B at 256 with
# adapters). The config blocks hold every field (`sam_config`), so the converter can write what a checkpoint's
# config.json says into a locked config.
SAM_SIZES = {
    'tiny': (dict(hidden_size=32, depth=2, num_heads=2, mlp_dim=64, out_chans=16, window_size=14,
                  global_attn_indexes=(1,)),
             dict(embed_dim=16, num_heads=2, mlp_dim=32, iou_head_hidden_dim=16, mask_in_chans=4)),
    'med2d_b': ({}, {}),
}

def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """Parses a big_vision-style arg string `a=1,b=x` over typed defaults; unknown keys are an error."""
    out = mlc.ConfigDict(defaults)
    for item in filter(None, (arg or '').split(',')):
        if '=' not in item:
            raise ValueError(f'config arg {item!r}: expected key=value')
        key, value = item.split('=', 1)
        if key not in defaults:
            raise ValueError(f'config arg {key!r}: unknown key; known: {sorted(defaults)}')
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ('true', 'false', '1', '0'):
                raise ValueError(f'config arg {key!r}: expected a bool, got {value!r}')
            out[key] = value.lower() in ('true', '1')
        else:
            out[key] = type(default)(value)
    return out


def llm_config(size: str) -> mlc.ConfigDict:
    if size not in LLM_SIZES:
        raise ValueError(f'unknown LLM size {size!r}; known: {sorted(LLM_SIZES)}')
    # The attention kernel settings, so `--config.model.llm.attention=splash` can pick them (LlamaConfig's defaults).
    kernel = {f.name: f.default for f in dataclasses.fields(LlamaConfig) if f.name in ('attention', 'attention_block')}
    return mlc.ConfigDict(dict(LLM_SIZES[size], **kernel))


def vision_config(size: str) -> mlc.ConfigDict:
    if size not in VISION_SIZES:
        raise ValueError(f'unknown vision size {size!r}; known: {sorted(VISION_SIZES)}')
    # select_layer -2 / select_feature 'patch': LLaVA-v1.5's feature (the reference's clip_encoder.py).
    return mlc.ConfigDict(dict(VISION_SIZES[size], select_layer=-2, select_feature='patch'))


def _fields(cls: type, exclude: tuple[str, ...] = (), **overrides) -> mlc.ConfigDict:
    """A config block from a config dataclass's own defaults (one home for each default), with overrides."""
    values = {f.name: dataclasses.asdict(f.default) if dataclasses.is_dataclass(f.default) else f.default
              for f in dataclasses.fields(cls) if f.name not in exclude and f.default is not dataclasses.MISSING}
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f'{cls.__name__}: unknown fields {sorted(unknown)}')
    return mlc.ConfigDict({**values, **overrides})


def moe_config(mode: str = 'none') -> mlc.ConfigDict:
    """Two-expert MoE FFN (models/config.py MoEConfig: the reference's stage-IV recipe). Sweep capacity_factor / top_k
    here; the aux loss is computed and logged whatever `aux_loss_coef` is."""
    return _fields(MoEConfig, mode=mode)


def lora_config(**overrides) -> mlc.ConfigDict:
    """peft-style LoRA (models/config.py LoRAConfig; rank 0 = none). Stage recipes (the reference's
    scripts/train_stage{2,3,4}.sh) live in the stage configs: II r16 on all seven projections, III r8 on gate/up/down,
    IV r8 on gate/up/down (per expert) + q/v."""
    if 'targets' in overrides:
        overrides['targets'] = tuple(overrides['targets'])
    return _fields(LoRAConfig, **overrides)


def medplib_config() -> mlc.ConfigDict:
    """MedPLIB's own fields (MedPLIBConfig); `seg_token_id` follows the vocab (`set_vocab`)."""
    return _fields(MedPLIBConfig, exclude=('llm', 'vision', 'sam_encoder', 'sam_decoder', 'projector_type'))


def sam_config(size: str) -> tuple[mlc.ConfigDict, mlc.ConfigDict]:
    """SAM-Med2D's image encoder and decoder blocks, every field present (dtypes follow the model's)."""
    if size not in SAM_SIZES:
        raise ValueError(f'unknown SAM size {size!r}; known: {sorted(SAM_SIZES)}')
    dtypes = ('dtype', 'param_dtype')
    encoder, decoder = SAM_SIZES[size]
    return (_fields(SamImageEncoderConfig, exclude=dtypes, **encoder),
            _fields(SamDecoderConfig, exclude=dtypes, **decoder))


def set_vocab(model: mlc.ConfigDict, vocab_size: int) -> mlc.ConfigDict:
    """Sizes a model config's vocab: the reference adds its tokens after the base vocab (train_ds_medplib.py), so
    `<SEG>`, the first of them, is `vocab_size - len(ADDED_TOKENS)`. The one place that rule lives."""
    model.llm.vocab_size = vocab_size
    model.medplib.seg_token_id = vocab_size - len(ADDED_TOKENS)
    return model


def model_config(llm: str = 'tiny', vision: str = 'tiny', dtype: str = 'float32', param_dtype: str = 'float32',
                 scan_layers: bool = False, remat_policy: str = 'none', moe: str = 'none',
                 sam: str = 'tiny') -> mlc.ConfigDict:
    cfg = mlc.ConfigDict()
    cfg.llm = llm_config(llm)
    cfg.vision = vision_config(vision)
    cfg.projector = mlc.ConfigDict(dict(type='mlp2x_gelu'))
    cfg.dtype = dtype  # compute dtype
    cfg.param_dtype = param_dtype
    cfg.scan_layers = scan_layers  # nn.scan over decoder layers; both layouts load the same weights
    cfg.remat_policy = remat_policy  # see medplib_jax.models.config.REMAT_POLICIES
    cfg.moe = moe_config(moe)
    cfg.lora = lora_config()
    cfg.sam_encoder, cfg.sam_decoder = sam_config(sam)
    cfg.medplib = medplib_config()
    return set_vocab(cfg, cfg.llm.vocab_size)


def dataset(path: str, weight: float = 1.0, image_folder: str = '') -> mlc.ConfigDict:
    """One entry of `config.data.datasets`: a records file (JSON list, JSON lines or `.array_record`; relative
    to `config.data.root`), its mixing weight, and its image folder ('' = `config.data.image_folder`, else the
    records file's folder)."""
    return mlc.ConfigDict(dict(path=path, weight=float(weight), image_folder=image_folder))


# The synthetic MeCoVQA-like training files (`medplib-jax make-demo-data`), as the demo mixes them.
DEMO_DATASETS = {'complex': ('MeCoVQA_Complex_VQA_train.json', 1.0),
                 'region': ('MeCoVQA_Region_VQA_train.json', 1.0),
                 'grounding': ('MeCoVQA_Grounding_train.json', 1.0)}


# The tiny model's data settings (DataConfig's defaults are the 7B recipe's). Its offline tokenizer spells most
# words in bytes, so conversations are long for their text.
TINY_DATA = dict(tokenizer='tiny', batch_size=4, length_buckets=(640, 768, 1024), mask_canvas=256)


def data_config(model: str = 'tiny', preset: str = 'demo') -> mlc.ConfigDict:
    """The grain input pipeline (medplib_jax/data/pipeline.py builds it). Fields:
    datasets: name -> dataset(...), mixed by weight in training (one pass in order for evaluation). Each dataset
      is reshuffled on each of its own epochs. One epoch of the mix (what num_epochs counts) is min(len_i / share_i)
      records: the dataset with the least data for its weight is read once, the others in part; each later epoch
      continues every dataset where it stopped.
    root: folder that relative dataset paths and image folders are relative to. image_folder: default image folder
      (the reference's --image_folder, e.g. SA-Med2D's SAMed2Dv1).
    tokenizer: 'tiny' (offline test tokenizer) or a local LLaMA tokenizer directory (MedPLIB tokens added/checked).
    batch_size: global. length_buckets: sequences (image tokens included: the reference's text max_length + 575)
      are padded to the smallest bucket that fits the batch; the last is the maximum, longer records are skipped.
    shuffle / num_epochs (0 = forever) / worker_count (grain processes) / worker_buffer_size / read_threads /
      prefetch (batches buffered per process).
    strict: a bad record is an error instead of a counted skip. max_skip_fraction: stop the run when more records
      than this are bad (checked from skip_check_after records on).
    mask_canvas: ground-truth masks stay at the original resolution, top-left in a canvas of this side (larger
      images are scaled down to fit). largest_component: the reference's region step
      (`generate_mask_with_sub_component`).
    check_duplicate_ids: one start-up pass per file. image_cache: a folder built by `build-image-cache` ('' = none).
    template: 'llava_v1' (stages II-IV) or 'plain' (stage I: image, caption, newline).
    """
    cfg = _fields(DataConfig, exclude=('datasets',), **(TINY_DATA if model == 'tiny' else {}))
    cfg.datasets = mlc.ConfigDict()
    if preset == 'demo':
        cfg.root = 'outputs/demo_data'
        cfg.datasets = mlc.ConfigDict({name: dataset(path, weight) for name, (path, weight) in DEMO_DATASETS.items()})
    elif preset != 'none':
        raise ValueError(f'config arg data={preset!r}: known: demo, none')
    return cfg


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> mlc.ConfigDict:
    """Mesh axis sizes; exactly one may be -1 (= all remaining devices)."""
    return mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Base config. arg keys: model (tiny|7b), dtype, scan, remat, moe (none|dense|first_half|second_half|sparse),
    data (demo: the synthetic MeCoVQA-like files under config.data.root | none: set config.data.datasets)."""
    a = parse_arg(arg, model='tiny', dtype='float32', scan=False, remat='none', moe='none', data='demo')
    sizes = {'tiny': ('tiny', 'tiny', 'tiny'), '7b': ('llama7b', 'clip_l336', 'med2d_b')}
    if a.model not in sizes:
        raise ValueError(f'config arg model={a.model!r}: known: {sorted(sizes)}')
    llm, vision, sam = sizes[a.model]
    cfg = mlc.ConfigDict()
    cfg.model = model_config(llm, vision, dtype=a.dtype, scan_layers=a.scan, remat_policy=a.remat, moe=a.moe, sam=sam)
    cfg.mesh = mesh_config()
    cfg.logical_axis_rules = LOGICAL_AXIS_RULES
    cfg.seed = 0
    cfg.data = data_config(a.model, a.data)
    # The train step's recipe (medplib_jax/train/config.py); the stage configs set it.
    cfg.train = _fields(TrainConfig)
    # Train-state checkpoints, resume and their retention (medplib_jax/train/config.py CheckpointConfig).
    cfg.checkpoint = _fields(CheckpointConfig)
    # Evaluators run every config.train.eval_every steps: name -> dict(kind=..., settings); see eval/registry.py.
    cfg.evals = mlc.ConfigDict()
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Stage configs (configs/stage1.py .. stage4.py) share this base: the 7B recipe of the reference's
# scripts/train_stage{2,3,4}.sh, or `model=tiny` on the synthetic data for a laptop.

# Trainable-path patterns (regexes over '/'-joined parameter paths; `layers.*` covers layers_i and scanned `layers`).
LORA = r'model/layers.*/lora_[AB]'
TRAINABLE = {
    'projector': r'model/mm_projector/.*',
    'lm_head': r'lm_head/.*',
    'embed_tokens': r'model/embed_tokens/.*',
    'norms': r'model/layers.*/(input|post_attention)_layernorm/.*',
    'mask_decoder': r'model/visual_model/mask_decoder/.*',
    'text_hidden_fcs': r'model/text_hidden_fcs/.*',
    'region_fea_adapter': r'model/region_fea_adapter/.*',
    'router': r'model/layers.*/mlp/gate/wg/kernel',
}
# The compute dtype of a stage config whose arg gives none (`dtype=` overrides it). The reference trains in bf16
# (train_ds_medplib.py: DeepSpeed `bf16` under --precision bf16) with fp32 master weights and optimizer state, as
# here: parameters and Adam moments stay `param_dtype` float32 and gradients are averaged in fp32 (train/step.py);
# softmax and norm statistics, logits, losses and the MoE gate stay fp32 (models/layers.py, losses.py, moe.py).
# The tiny model is the CPU test model: fp32.
STAGE_DTYPE = {'7b': 'bfloat16', 'tiny': 'float32'}
STAGE_ARGS = dict(model='7b', init='prev', dtype='', scan=False, remat='', data='', hw='')

# Hardware presets (stage configs' `hw=` arg): the mesh, the micro-batch (through config.train.grad_accum; the
# global batch config.data.batch_size stays 128), the remat policy, the scanned layer layout and, on TPU, the
# splash attention kernel (model.llm.attention) and the grouped MoE dispatch (model.moe.dispatch), per target and
# stage. Keys: the hw name, then the stage ('*' = any stage without its own entry). `remat=` in the arg and
# `--config.*` flags still override a preset. FSDP over every chip (7B's vocab 32267 is odd, so no tensor axis).
# Measured with `medplib-jax compile-check` (docs/training.md, "Will it fit?" and "Estimated step time"; step times
# are XLA's cost-model ESTIMATES, nothing ran on a TPU). 7B stage IV in fp32 compute and full remat: v5p-64 13.5 GiB
# per chip, v5p-256 17.2 GiB, 8 x H100 24.8 GiB (a CPU estimate); bf16 compute (STAGE_DTYPE) 11.6 GiB on v5p-64.
# Scanned layers also make the 7B compile take minutes instead of hours (one decoder layer compiled, not 32).
HW_PRESETS = {
    # Stage IV in one micro-batch of 128 (4 rows per chip: each chip routes a whole MoE group of 4 sequences, the
    # reference's per-GPU micro-batch) with the grouped MoE dispatch (each chip computes its own tokens' expert
    # rows) and no remat: 60.6 GiB per chip, 0.72 s per step (estimate). In micro-batches of 32 with the einsum
    # dispatch a group spanned 4 chips and 24 of 32 chips had no expert work: 13.6 s. remat dots_no_batch: 29.8
    # GiB, 0.88 s; the einsum dispatch with dots_no_batch 18.9 GiB, 1.10 s.
    'v5p-64': {'*': dict(mesh=dict(data=1, fsdp=32, tensor=1), grad_accum=4, remat='full', scan=True,
                         attention='auto', dispatch='grouped'),
               'IV': dict(mesh=dict(data=1, fsdp=32, tensor=1), grad_accum=1, remat='none', scan=True,
                          attention='auto', dispatch='grouped')},
    # One row per chip: stage IV's routing groups straddle 4 chips, which the grouped dispatch does not mind (only
    # the gate's logits move). No remat: 17.4 GiB, 0.26 s (estimate); full remat 0.36 s.
    'v5p-256': {'*': dict(mesh=dict(data=1, fsdp=128, tensor=1), grad_accum=1, remat='full', scan=True,
                          attention='auto', dispatch='grouped'),
                'IV': dict(mesh=dict(data=1, fsdp=128, tensor=1), grad_accum=1, remat='none', scan=True,
                           attention='auto', dispatch='grouped')},
    # stage III's loss groups of 32 sequences need micro-batches of 32 or more
    # stage IV: micro-batches of 32, one routing group of 4 per GPU (25.1 GiB per GPU by the CPU estimate)
    '8xh100': {'*': dict(mesh=dict(data=1, fsdp=8, tensor=1), grad_accum=8, remat='full', scan=True),
               'III': dict(mesh=dict(data=1, fsdp=8, tensor=1), grad_accum=4, remat='full', scan=True),
               'IV': dict(mesh=dict(data=1, fsdp=8, tensor=1), grad_accum=4, remat='full', scan=True)},
}


def apply_hw(cfg: mlc.ConfigDict, hw: str, remat: str = '') -> mlc.ConfigDict:
    """Applies the `hw` preset of HW_PRESETS to a stage config ('' = none; `remat`: the arg's, which wins)."""
    if hw:
        if hw not in HW_PRESETS:
            raise ValueError(f'config arg hw={hw!r}: unknown; known: {", ".join(HW_PRESETS)}')
        presets = HW_PRESETS[hw]
        p = presets.get(cfg.train.stage, presets['*'])
        cfg.mesh = mesh_config(**p['mesh'])
        cfg.train.grad_accum = p['grad_accum']
        cfg.model.remat_policy = p['remat']
        cfg.model.scan_layers = p['scan']
        # 'auto': the splash kernel on TPU; a run's parameters evaluated on CPU / GPU get the einsum path
        cfg.model.llm.attention = p.get('attention', cfg.model.llm.attention)
        cfg.model.moe.dispatch = p.get('dispatch', cfg.model.moe.dispatch)
    if remat:
        cfg.model.remat_policy = remat
    return cfg


def stage_config(arg: str | None, *, stage: str, files: dict[str, str], demo_files: tuple[str, ...],
                 **arg_defaults) -> tuple[mlc.ConfigDict, mlc.ConfigDict]:
    """The common part of a stage config. arg keys: model (7b | tiny), init (prev: the previous stages' run dirs
    beside this run's workdir, `{runs}/stageN` | random: tests), dtype (compute; default STAGE_DTYPE's), scan,
    remat, data (mecovqa: the reference's file names under config.data.root | demo: the synthetic set; default
    mecovqa for 7b, demo for tiny), hw (a HW_PRESETS name: the stage config ends with `apply_hw(cfg, a.hw,
    a.remat)`).
    files: dataset name -> the reference's records file; demo_files: the synthetic files (DEMO_FILES keys)."""
    a = parse_arg(arg, **STAGE_ARGS, **arg_defaults)
    if a.init not in ('prev', 'random'):
        raise ValueError(f'config arg init={a.init!r}: known: prev (the previous stages beside the workdir), random')
    data = a.data or ('demo' if a.model == 'tiny' else 'mecovqa')
    if data not in ('mecovqa', 'demo'):
        raise ValueError(f'config arg data={data!r}: known: mecovqa, demo')
    dtype = a.dtype or STAGE_DTYPE.get(a.model, '')  # an unknown model is get_config's error
    cfg = get_config(f'model={a.model},dtype={dtype},scan={a.scan},remat={a.remat or "none"},data=none')
    if data == 'demo':
        cfg.data.root = 'outputs/demo_data'
        cfg.data.datasets = mlc.ConfigDict({k: dataset(DEMO_FILES[k].format(split='train')) for k in demo_files})
    else:
        cfg.data.datasets = mlc.ConfigDict({k: dataset(v) for k, v in files.items()})
    cfg.train.stage = stage
    if a.model != 'tiny':  # a 7B run saves its state every 500 steps and at every held-out evaluation, and keeps
        cfg.checkpoint.every = 500  # the newest two and the best by the held-out loss (stage I has no evaluator)
        cfg.checkpoint.best_metric = 'eval/held_out/loss'
    return cfg, a


def held_out(files: dict[str, str] | tuple[str, ...], demo: bool, max_batches: int = 0) -> mlc.ConfigDict:
    """A `held_out_loss` evaluator over records files (synthetic test splits when `demo`)."""
    if demo:
        files = {k: DEMO_FILES[k].format(split='test') for k in files}
    return mlc.ConfigDict(dict(kind='held_out_loss', max_batches=max_batches,
                               datasets=mlc.ConfigDict({k: dataset(v) for k, v in files.items()})))



# The paper's evaluators (medplib_jax/eval/evaluators.py) over the reference's test files or the synthetic set's
# test split (`make-demo-data`).
PAPER_EVAL_FILES = {
    'mecovqa': dict(REFERENCE_TEST_FILES),
    'demo': {'omnimedvqa': DEMO_FILES['closed'].format(split='test'),
             'mecovqa_c': DEMO_FILES['complex'].format(split='test'),
             'mecovqa_r': DEMO_FILES['region'].format(split='test'),
             'mecovqa_g': DEMO_FILES['grounding'].format(split='test')},
}


def evaluator(kind: str, path: str, **settings) -> mlc.ConfigDict:
    """One of the paper's evaluators over one records file, every EvalSettings field present (so each can be
    overridden: `--config.evals.mecovqa_g.max_records=100`)."""
    cfg = _fields(EvalSettings, **settings)
    cfg.kind = kind
    cfg.datasets = mlc.ConfigDict({kind: dataset(path)})
    return cfg


def paper_evals(preset: str = 'demo', **settings) -> mlc.ConfigDict:
    """Table 1's and Table 2's evaluators by name (omnimedvqa, mecovqa_c, mecovqa_r, mecovqa_g) over the
    `mecovqa` test files or the synthetic `demo` ones; `settings` go to each (e.g. max_records=200)."""
    if preset not in PAPER_EVAL_FILES:
        raise ValueError(f'config arg data={preset!r}: known: {", ".join(PAPER_EVAL_FILES)}')
    return mlc.ConfigDict({kind: evaluator(kind, path, **settings) for kind, path in PAPER_EVAL_FILES[preset].items()})
