"""Stage IV: MoE adaption (the reference's scripts/train_stage4.sh, MedPLIBForCausalLM).

All of MeCoVQA, 3 epochs, lr 3e-4, max length 1024 (+ 575), micro-batch 4 x 8 accumulation x 4 GPUs = 128. Every
FFN becomes the two-expert MoE (top-1, capacity factor 1.5, evaluation 2, aux coefficient 0, routing groups of 4
sequences = the reference's per-GPU micro-batch); LoRA r8 / alpha 16 / dropout 0.05 on gate, up, down (per
expert) and q, v. Fully trained: the router, lm_head, embed_tokens, mask decoder, T-projector and region adapter.
Loss weights ce 1, bce 2, dice 0.5, iou 0, focal 0. Starts (the reference's `initialize_moe_modules`) from stage II,
expert 0 = stage III's FFN (grounding), expert 1 = stage II's (vision-language), mask decoder and T-projector
from stage III.

`sweep()` is the paper's Table 4 grid: `medplib-jax sweep --config=configs/stage4.py --workdir=runs/sweep`.
"""
from configs.common import LORA, TRAINABLE, apply_hw, held_out, lora_config, stage_config


def get_config(arg=None):
    cfg, a = stage_config(arg, stage='IV', files={'mecovqa': 'MeCoVQA_train.json'},
                          demo_files=('complex', 'region', 'grounding', 'closed'))
    tiny = a.model == 'tiny'
    cfg.model.moe.mode = 'dense'
    cfg.model.lora = lora_config(rank=8, alpha=16.0, dropout=0.05,
                                 targets=('gate_proj', 'up_proj', 'down_proj', 'q_proj', 'v_proj'))
    if not tiny:
        cfg.data.length_buckets = (1024, 1599)  # model_max_length 1024 + 575 image positions
    cfg.train.trainable = (TRAINABLE['router'], LORA, TRAINABLE['lm_head'], TRAINABLE['embed_tokens'],
                           TRAINABLE['mask_decoder'], TRAINABLE['text_hidden_fcs'], TRAINABLE['region_fea_adapter'])
    cfg.train.lr = 3e-4
    cfg.train.epochs = 3.0
    cfg.train.grad_accum = 1 if tiny else 8
    cfg.train.loss_group = 4
    cfg.train.weights = dict(ce=1.0, bce=2.0, dice=0.5, iou=0.0, focal=0.0)
    if a.init != 'random':
        cfg.train.init.params = '{runs}/stage2'
        cfg.train.init.experts = ('{runs}/stage3', '{runs}/stage2')
        cfg.train.init.load = (f'{TRAINABLE["mask_decoder"]}={{runs}}/stage3',
                               f'{TRAINABLE["text_hidden_fcs"]}={{runs}}/stage3')
    cfg.train.eval_every = 0 if tiny else 500
    cfg.train.log_every = 10 if tiny else 50
    cfg.evals.held_out = held_out({'grounding': 'MeCoVQA_Grounding_test_rand500.json'} if not tiny
                                  else ('complex', 'grounding'), demo=tiny)
    return apply_hw(cfg, a.hw, a.remat)  # hw= preset: mesh, micro-batch, remat (configs/common.py)


def sweep():
    """The paper's Table 4: capacity factor 1, 1.5, 2 with top-1, and 2 with top-2. Each point: (name, overrides)."""
    for cf, k in ((1.0, 1), (1.5, 1), (2.0, 1), (2.0, 2)):
        yield f'cf{cf:g}_top{k}', {'model.moe.capacity_factor': cf, 'model.moe.top_k': k}
