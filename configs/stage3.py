"""Stage III: pixel grounding (the reference's scripts/train_stage3.sh without its stray --eval_only).

MeCoVQA-G, 10 epochs, lr 3e-4, max length 2048 (+ 575), micro-batch 32 x 1 accumulation x 4 GPUs = 128; LoRA r8 /
alpha 16 / dropout 0.05 on gate, up, down; fully trained: the mask decoder and the T-projector (re-created fresh,
as the reference re-initialises `text_hidden_fcs`). Not trained: lm_head, embed_tokens, norms, projector, region
adapter. Loss weights ce 1, bce 1, dice 5, iou 0, focal 1. Starts from stage II's merged parameters.
"""
from configs.common import LORA, TRAINABLE, apply_hw, held_out, lora_config, stage_config


def get_config(arg=None):
    cfg, a = stage_config(arg, stage='III', files={'grounding': 'MeCoVQA_Grounding_train.json'},
                          demo_files=('grounding',))
    tiny = a.model == 'tiny'
    cfg.model.lora = lora_config(rank=8, alpha=16.0, dropout=0.05, targets=('gate_proj', 'up_proj', 'down_proj'))
    cfg.train.trainable = (LORA, TRAINABLE['mask_decoder'], TRAINABLE['text_hidden_fcs'])
    cfg.train.lr = 3e-4
    cfg.train.epochs = 10.0
    cfg.train.grad_accum = 1
    cfg.train.loss_group = 0 if tiny else 32
    cfg.train.weights = dict(ce=1.0, bce=1.0, dice=5.0, iou=0.0, focal=1.0)
    if a.init != 'random':
        cfg.train.init.params = '{runs}/stage2'
    cfg.train.init.fresh = (TRAINABLE['text_hidden_fcs'],)
    cfg.train.eval_every = 0 if tiny else 300
    cfg.train.log_every = 10 if tiny else 50
    cfg.evals.held_out = held_out({'grounding': 'MeCoVQA_Grounding_test_rand500.json'} if not tiny
                                  else ('grounding',), demo=tiny)
    return apply_hw(cfg, a.hw, a.remat)  # hw= preset: mesh, micro-batch, remat (configs/common.py)
