"""The main job's config: the tiny MedPLIB through stages I to IV on the synthetic MeCoVQA-like set, on CPU.

Each stage is the real stage config (configs/stage1.py .. stage4.py with `model=tiny`), shortened: the same
trainable sets, loss weights, LoRA / MoE layout and hand-offs (stage IV builds its experts from stages III and II),
run one after the other in `workdir/stage1` .. `workdir/stage4`. Where the tiny random model cannot stand in for
the reference's pre-trained parts, the demo deviates, each deviation named below: the demo tokenizer (the synthetic
set's words as whole pieces), a trained CLIP tower (stages I-II), a wider, trained SAM encoder (stage III), the
corrected mask geometry for non-square images (`aligned`), stage II's mix weighted towards the complex file (its
where-questions), lm_head trained in stage III and handed to stage IV, and learning rates for a small random
model.

    medplib-jax demo                                   # writes the data, trains, shows the trained model
    medplib-jax train --config=configs/demo.py --workdir=runs/demo      # the training alone (data must exist)

arg keys: root (the synthetic data folder, shared by every stage: `--config.demo.root` moves them all), steps
(optimizer steps per stage: one number, or four separated by ':'), images (synthetic images; 7 to 11 records each,
every fifth image held out).
"""
import importlib

import ml_collections as mlc

from configs.common import TRAINABLE, parse_arg, set_vocab
from medplib_jax.data import synthetic

# Each setting below departs from the stage configs for the tiny random model; docs/demo.md ("Why configs/demo.py
# is set as it is") has what was measured to choose each.
# Learning rates for a small random model (the 7B recipe's cannot move it in a few hundred steps).
DEMO_LR = {'stage1': 1e-2, 'stage2': 3e-3, 'stage3': 1e-3, 'stage4': 5e-4}
# Steps per stage: stage II until the where-answers carry the organ asked to the `<SEG>` position.
DEMO_STEPS = '30:800:450:200'
# A 64-wide SAM neck / decoder, its image encoder trained in stage III (a stand-in for SAM-Med2D's pre-training).
DEMO_SAM_WIDTH = 64
SAM_ENCODER = r'model/visual_model/image_encoder/.*'
# The CLIP tower trained in stages I-II (a stand-in for its pre-training).
VISION_TOWER = r'model/vision_tower/.*'
# The mask geometry for non-square images ('aligned'; converted release weights keep the reference's crop).
DEMO_POSTPROCESS = 'aligned'
# Stage II samples the complex file (with the where-questions) five times as often as the others.
DEMO_COMPLEX_WEIGHT = 5.0
# lm_head trained in stage III and handed to stage IV (so stage III keeps emitting `<SEG>`).
LM_HEAD = TRAINABLE['lm_head']
# The LLM's causal attention in query blocks of 128 (the same function up to rounding; a faster stage-II step).
DEMO_ATTENTION_BLOCK = 128


def get_config(arg=None):
    a = parse_arg(arg, root='outputs/demo_data', steps=DEMO_STEPS, images=120)
    steps = [int(s) for s in a.steps.split(':')]
    if len(steps) == 1:
        steps *= 4
    if len(steps) != 4:
        raise ValueError(f'config arg steps={a.steps!r}: one number or four separated by ":"')
    root = mlc.FieldReference(a.root)
    cfg = mlc.ConfigDict()
    # The demo command: writes `synthetic_images` images (7 to 11 records each) to `root` first (0 = use the data
    # there), trains into `workdir` (or --workdir), then evaluates the trained and the initialised model on the test
    # split.
    # eval: answer lengths per evaluator (the longest synthetic answer is 19 demo-tokenizer tokens; an untrained
    # model rarely stops by itself), requests decoded together, records per evaluator (0: all), overlay
    # pictures per evaluator, records per kind for the routing shares (0: all).
    cfg.demo = mlc.ConfigDict(dict(
        root=root, synthetic_images=a.images, workdir='outputs/demo',
        eval=dict(max_new_tokens=dict(omnimedvqa=8, mecovqa_c=32, mecovqa_r=32, mecovqa_g=4), batch_size=8,
                  max_records=0, pictures=4, routing_records=0)))
    cfg.stages = mlc.ConfigDict()
    vocab = synthetic.demo_vocab_size()  # `<SEG>`, the first added token, follows the base vocab
    for k, n in enumerate(steps, start=1):
        name = f'stage{k}'
        stage = importlib.import_module(f'configs.{name}').get_config('model=tiny')
        stage.data.root = root
        # The demo tokenizer (written beside the data by make_demo_data): the synthetic set's words as whole pieces.
        stage.data.tokenizer = root + '/' + synthetic.TOKENIZER
        set_vocab(stage.model, vocab)
        stage.model.sam_encoder.out_chans = DEMO_SAM_WIDTH
        stage.model.sam_decoder.update(embed_dim=DEMO_SAM_WIDTH, mlp_dim=2 * DEMO_SAM_WIDTH,
                                       iou_head_hidden_dim=DEMO_SAM_WIDTH)
        stage.model.medplib.postprocess = DEMO_POSTPROCESS
        stage.model.llm.attention_block = DEMO_ATTENTION_BLOCK
        if name in ('stage1', 'stage2'):
            stage.train.trainable = (*stage.train.trainable, VISION_TOWER)
        if name == 'stage2':
            stage.data.datasets.complex.weight = DEMO_COMPLEX_WEIGHT
        if name == 'stage3':
            stage.train.trainable = (*stage.train.trainable, SAM_ENCODER, LM_HEAD)
        if name == 'stage4':
            stage.train.init.load = (*stage.train.init.load, *(f'{k}={{runs}}/stage3' for k in (SAM_ENCODER, LM_HEAD)))
        stage.train.steps_per_epoch = n  # the whole schedule (warmup and decay) fits the short run
        stage.train.epochs = 1.0
        stage.train.lr = DEMO_LR[name]
        stage.train.log_every = 10
        if stage.model.moe.mode != 'none':
            # One sequence per routing group: the einsum MoE's cost grows with the group; faithful otherwise.
            stage.model.moe.group_size = 1
        cfg.stages[name] = stage
    return cfg
