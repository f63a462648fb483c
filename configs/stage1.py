"""Stage I: projector alignment (LLaVA-1.5's pre-training recipe; the reference leaves this stage to LLaVA's code).

Only the mlp2x_gelu projector trains, on image-caption pairs with LLaVA's `plain` template (image, caption,
newline), lr 1e-3, 1 epoch, global batch 128 (the stage-II script's projector path says bs128). The reference used
LLaVA-Med's `llava_med_alignment_500k`; `model=tiny` uses the synthetic set's complex-VQA answers as captions.
Start (LLaVA-1.5's pre-training): Vicuna-7B-v1.5 with CLIP and SAM-Med2D, converted to an Orbax params directory
(`{runs}/vicuna-7b-v1.5` by default, `medplib-jax convert llama`), and a fresh projector (the region adapter and
T-projector, in no converted checkpoint, start fresh too); random for `model=tiny`.

    medplib-jax train --config=configs/stage1.py --workdir=runs/stage1 --config.data.root=/data/llava_med
"""
from configs.common import TRAINABLE, apply_hw, stage_config


def get_config(arg=None):
    cfg, a = stage_config(arg, stage='I', files={'alignment': 'llava_med_alignment_500k.json'},
                          demo_files=('complex',))
    tiny = a.model == 'tiny'
    cfg.data.template = 'plain'
    cfg.train.trainable = (TRAINABLE['projector'],)
    cfg.train.lr = 1e-3
    cfg.train.epochs = 1.0
    cfg.train.weights = dict(ce=1.0, bce=0.0, dice=0.0, iou=0.0, focal=0.0)  # captions only
    # The first stage starts from converted weights (an Orbax params directory) or, for tests, random.
    if not (tiny or a.init == 'random'):
        # `medplib-jax convert llama --src vicuna-7b-v1.5 --clip ... --sam-med2d ...` writes it (docs/conversion.md).
        cfg.train.init.params = '{runs}/vicuna-7b-v1.5'
        # LLaVA's pre-training starts the projector anew; the region adapter and T-projector, which no converted
        # checkpoint has, start at their initialisation (stage I does not train them).
        cfg.train.init.fresh = (TRAINABLE['projector'], TRAINABLE['region_fea_adapter'], TRAINABLE['text_hidden_fcs'])
    cfg.train.log_every = 10 if tiny else 50
    return apply_hw(cfg, a.hw, a.remat)  # hw= preset: mesh, micro-batch, remat (configs/common.py)
