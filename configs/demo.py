"""The main job's config: the tiny MedPLIB through stages I to IV on the synthetic MeCoVQA-like set, on CPU.

Each stage is the real stage config (configs/stage1.py .. stage4.py with `model=tiny`), shortened: the same
trainable sets, loss weights, LoRA / MoE layout and hand-offs (stage IV builds its experts from stages III and II),
run one after the other in `workdir/stage1` .. `workdir/stage4`:

    medplib-jax demo                                   # writes the data, trains, shows the trained model
    medplib-jax train --config=configs/demo.py --workdir=runs/demo      # the training alone (data must exist)

arg keys: root (the synthetic data folder, shared by every stage: `--config.demo.root` moves them all), steps
(optimizer steps per stage: one number, or four separated by ':'), images (synthetic images; 6 records each, every
fifth image held out).
"""
import importlib

import ml_collections as mlc

from configs.common import parse_arg

# Learning rates for the tiny model: the 7B recipe's are tuned for a pretrained 7B LLM, far too small to move a
# randomly initialised 64-wide one in a few dozen steps.
DEMO_LR = {'stage1': 3e-3, 'stage2': 3e-3, 'stage3': 1e-2, 'stage4': 2e-3}


# Steps: stage III gets the most, because its frozen (random) SAM encoder gives the mask decoder little to work
# with: on the synthetic set its Dice loss stays near 0.94 for about 40 steps, then falls to about 0.73 by 150.


def get_config(arg=None):
    a = parse_arg(arg, root='outputs/demo_data', steps='30:60:150:40', images=120)
    steps = [int(s) for s in a.steps.split(':')]
    if len(steps) == 1:
        steps *= 4
    if len(steps) != 4:
        raise ValueError(f'config arg steps={a.steps!r}: one number or four separated by ":"')
    root = mlc.FieldReference(a.root)
    cfg = mlc.ConfigDict()
    # The demo command: writes `synthetic_images` images (x6 records) to `root` first (0 = use the data there),
    # trains into `workdir` (or --workdir), then evaluates the trained and the initialised model on the test split.
    # eval: answer lengths per evaluator (the longest synthetic answer is about 40 tiny-tokenizer tokens; an
    # untrained model rarely stops by itself), requests decoded together, records per evaluator (0: all), overlay
    # pictures per evaluator, records per kind for the routing shares (0: all).
    cfg.demo = mlc.ConfigDict(dict(
        root=root, synthetic_images=a.images, workdir='outputs/demo',
        eval=dict(max_new_tokens=dict(omnimedvqa=8, mecovqa_c=64, mecovqa_r=48, mecovqa_g=4), batch_size=8,
                  max_records=0, pictures=4, routing_records=0)))
    cfg.stages = mlc.ConfigDict()
    for k, n in enumerate(steps, start=1):
        name = f'stage{k}'
        stage = importlib.import_module(f'configs.{name}').get_config('model=tiny')
        stage.data.root = root
        stage.train.steps_per_epoch = n  # the whole schedule (warmup and decay) fits the short run
        stage.train.epochs = 1.0
        stage.train.lr = DEMO_LR[name]
        stage.train.log_every = 10
        if stage.model.moe.mode != 'none':
            # One sequence per routing group: the einsum MoE's cost grows with the group; faithful otherwise.
            stage.model.moe.group_size = 1
        cfg.stages[name] = stage
    return cfg
