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

# Learning rates for the tiny model: the 7B recipe's are tuned for a pretrained 7B LLM, far too small to move a
# randomly initialised 64-wide one in a few hundred steps. Stage III's is lower than the others: at 1e-2 the mask
# decoder settles on empty masks (Dice loss flat at 0.95 over 200 steps; measured with the SAM encoder still frozen,
# see DEMO_SAM_WIDTH); at 1e-3 it falls to 0.64.
# Stage IV's too: it trains the mask decoder and T-projector under the recipe's BCE-heavy weights (bce 2, dice 0.5),
# and at 2e-3 its 60 steps took the held-out mDice from stage III's 30 to 4; at 5e-4 it stays at 30 (both with the
# reference geometry and 300 stage-III steps; before the where-questions, 5e-4 took stage III's 57.0 to 53.2; with
# them and 800 stage-III steps stage IV ended at 85.4).
DEMO_LR = {'stage1': 1e-2, 'stage2': 3e-3, 'stage3': 1e-3, 'stage4': 5e-4}
# Steps per stage (measured on the synthetic set, 2-core CPU): stage II's token accuracy reaches about 0.87 by 150
# steps (0.46 at 60 with the byte-level tiny tokenizer), but carrying the organ asked to the `<SEG>` position
# (DEMO_COMPLEX_WEIGHT) takes longer and is a sudden, start-dependent transition: after 600 steps (about 0.47 s
# each) the held-out where-answers named the right organ in 39, 16, 35 and 22 of 41 (two starts; lr 3e-3, and 6e-3
# and 1e-2 on the second), after 800 in 41 of 41 (the default start), after 900 in 41 of 41 (both starts). Stage
# III's held-out mDice then grows with its steps (about 0.35 s each), and stage IV's (about 0.43 s) add to it:
# 500 + 60 stage III + IV steps 63.5, 500 + 200 66.8 (the same stages I-III), 400 + 200 63.8, 450 + 200 70.4
# (800 stage-II steps; 67.5 / 69.8 with 150 / 250 stage-IV steps), 800 + 60 85.4 (which does not fit 15 minutes).
# Stage IV needs its steps for the routing too (see medplib_jax/main/demo.py: the share of question tokens sent to the
# grounding expert, grounding against VQA questions): with its recipe (top-1, p-scaled expert output, no aux loss)
# the router only learns whether more of the chosen expert's output helps, and 90 % of the routed tokens are image
# tokens, which precede the question and cannot tell the tasks apart. On the stages I-III of 30:900:500, its random
# init started the VQA questions ahead (55.0 grounding against 62.2 VQA at step 0); 60 steps left 54.1 against
# 54.5, 200 steps 50.4 against 46.1; on the default schedule 150 / 200 / 250 steps gave 32.5 / 30.7 / 22.7
# against 32.8 / 27.7 / 20.5. The reference answers' tokens separate far more (about 80 against 30 from 150 steps
# on). Tried, not adopted (on those 30:900:500 stages): the router at 10x / 40x the learning rate (60 steps: every
# token of layer 0 to the grounding expert, of layer 1 to the other, no separation) and the reference's CLI-default
# aux loss 0.01 (54.3 against 54.8). With all tokens forced to one expert at stage IV's start (same stages) the
# experts are what their stages made them: the grounding expert mDice 67.8, MeCoVQA-C recall 10.9, closed 37.5;
# the vision-language expert 49.1, 87.9, 100.
DEMO_STEPS = '30:800:450:200'


# The demo's SAM (named deviation from the stage configs, which train the mask decoder only): the reference's SAM
# is SAM-Med2D, pre-trained on 4.6M medical masks; the tiny one is random, and a frozen random encoder with a
# 16-wide decoder leaves the mask decoder almost nothing to separate organs by (held-out Dice about 0.13 after 300
# steps even with the class given directly, 0.58 with a 64-wide decoder). So the demo widens the SAM neck / decoder
# to DEMO_SAM_WIDTH and trains the image encoder in stage III (stage IV takes it from stage III with the mask
# decoder), as a stand-in for SAM-Med2D's pre-training: stage III's held-out mDice (300 steps, reference geometry)
# 30.2 with the encoder frozen, 37.6 trained (those 0.58 and 30.2 were measured while a stop_gradient in the model
# kept the encoder frozen whatever config.train.trainable said; it is gone, tests/test_train_step.py checks that a
# named tower trains). A 64-wide encoder (hidden_size 64, mlp_dim 128, 4 heads) instead of the tiny 32: 49.4
# against 45.9 (300 steps, aligned geometry) for 18 % more time a step; more steps paid more (DEMO_STEPS).
DEMO_SAM_WIDTH = 64
SAM_ENCODER = r'model/visual_model/image_encoder/.*'
# Likewise the CLIP tower (another named deviation): the reference's is pre-trained and frozen; a random one puts a
# LayerNorm over each patch embedding before anything else (CLIP's pre_layrnorm), and a flat patch's embedding is
# its intensity times the conv kernel, so that norm maps dark and bright grey patches to the same vector and the
# modality of a grey image is all but invisible. The demo trains the tower in stages I and II (stages III and IV
# start from stage II's, as they would from the pre-trained one). Until the stop_gradient above was removed the
# tower stayed random; closed-VQA reached 100 either way, once the synthetic X-ray filled its frame.
VISION_TOWER = r'model/vision_tower/.*'
# Mask geometry (a third named deviation): the reference crops SAM's 64x64 low-res map as if it were the 256x256
# padded input (models/masks.py, 'reference'), so on a non-square image the loss and the prediction see a shifted,
# rescaled strip, padding included; the released weights learnt to paint into it. Two of the synthetic set's three
# image sizes are non-square, and a SAM trained from scratch is new training, for which masks.py's 'aligned' mode
# (upsample to 256, crop the image's own region, resize) is meant. Stage III's held-out mDice (250 stage-II, 300
# stage-III steps, seed 0): 37.6 'reference', 45.9 'aligned' (160x256 images 21.1 -> 37.2, 256x176 35.9 -> 41.9,
# square 44.1 -> 51.2).
DEMO_POSTPROCESS = 'aligned'
# The where-questions (data/synthetic.py WHERE_Q: "Where is the heart in this image?" -> "heart, in the upper left
# part of the image.") are what makes a mask follow the organ asked: their first answer token is predicted at the
# `:` of `ASSISTANT:`, the position whose state becomes the `<SEG>` prompt, so stage II must learn to carry the
# question's organ there, which the tiny LLM never learns from the mask loss (stage III trains per-position FFN
# LoRA only; without them every organ of an image got the same mask: Dice 0.49 against the organ asked, 0.46
# against another). Stage II mixes the complex file (where-questions included) DEMO_COMPLEX_WEIGHT times as often as
# the others: the held-out where-answers name the right organ in 41 of 41 after 800 and 900 steps (at weight 1:
# 15 / 33 / 41 of 41 after 600 / 1000 / 1500 steps, which does not fit the demo's 15 minutes; see DEMO_STEPS). Then
# stage III's masks follow the question (Dice 0.82 against the organ asked, 0.09 against the image's other organs;
# measured after 1500 stage-II steps at weight 1 and 800 stage-III steps).
# Tried, not adopted: the CLIP tower frozen in stage II (0.32 s a step instead of 0.47, but 17 of 41 after 900
# steps) and where-questions about the organs an image lacks ("kidney, not in this image.": 24 of 41 after 600).
DEMO_COMPLEX_WEIGHT = 5.0
# Two more named deviations follow from them: stage II now answers "Could you segment out the heart" with "heart",
# and stage III with its LoRA FFN alone stopped emitting `<SEG>` (2 of 41 held-out questions), so stage III also
# trains lm_head; and stage IV takes lm_head from stage III, not stage II (from stage II, its 60 steps answered
# grounding questions as where-questions, 0 of 41 with `<SEG>`: held-out mDice 57.7 from the fallback state, 74.3
# with stage III's lm_head; 1500 / 800 stage II / III steps).
LM_HEAD = TRAINABLE['lm_head']
# The LLM's causal attention in query blocks of 128 (models/layers.py causal_attention: the fully-masked blocks
# above the diagonal are skipped; the same function of the inputs, up to float rounding). Stage II's step, where
# the demo spends most of its time: 0.88-0.99 s against 1.03-1.05 s with one (640, 640) block (paired runs, 2-core
# machine under other load).
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
