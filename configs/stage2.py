"""Stage II: vision-language recognition (the reference's scripts/train_stage2.sh, LISAForCausalLM, no MoE).

Complex + region + public VQA, 3 epochs, lr 1e-4, max length 2048 (+ 575 image positions), micro-batch 16 x 2
accumulation x 4 GPUs = 128; LoRA r16 / alpha 16 / dropout 0.05 on q, k, v, o, gate, up, down; fully trained:
lm_head, embed_tokens, both layer norms of every layer, the projector. Not trained (as in the reference): the
final norm, the region adapter (not in the script's --sft_modules), the mask decoder and T-projector (no masks in its
data). Loss weights ce 1, bce 1, dice 5 (iou 2 / focal 2 are defaults with nothing to act on).
Start (the script's --version): LLaVA-v1.5-7B (its LLM and CLIP, with SAM-Med2D) converted to an Orbax params directory
(`{runs}/llava-v1.5-7b`, `medplib-jax convert llama`), with the projector of stage I (the reference's
--pretrain_mm_mlp_adapter) and a fresh region adapter and T-projector. `model=tiny` starts from the whole stage-I
run (there is no tiny LLaVA).
"""
from configs.common import LORA, TRAINABLE, apply_hw, held_out, lora_config, stage_config


def get_config(arg=None):
    cfg, a = stage_config(arg, stage='II', files={'mecovqa': 'MeCoVQA_Complex+Region_VQA_train+Public_VQA.json'},
                          demo_files=('complex', 'region', 'closed'))
    tiny = a.model == 'tiny'
    cfg.model.lora = lora_config(rank=16, alpha=16.0, dropout=0.05, targets=(
        'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'))
    cfg.train.trainable = (LORA, TRAINABLE['lm_head'], TRAINABLE['embed_tokens'], TRAINABLE['norms'],
                           TRAINABLE['projector'])
    cfg.train.lr = 1e-4
    cfg.train.epochs = 3.0
    cfg.train.grad_accum = 1 if tiny else 2
    cfg.train.loss_group = 0 if tiny else 16
    cfg.train.weights = dict(ce=1.0, bce=1.0, dice=5.0, iou=2.0, focal=2.0)
    if a.init != 'random':
        cfg.train.init.params = '{runs}/stage1' if tiny else '{runs}/llava-v1.5-7b'
        if not tiny:  # `medplib-jax convert llama --src llava-v1.5-7b --clip ... --sam-med2d ...` (docs/conversion.md)
            cfg.train.init.load = (f'{TRAINABLE["projector"]}={{runs}}/stage1',)
            # Not in LLaVA-v1.5-7B: the reference starts both fresh here (the region adapter from HF's missing-weight
            # init, the T-projector re-created by train_ds_medplib.py).
            cfg.train.init.fresh = (TRAINABLE['region_fea_adapter'], TRAINABLE['text_hidden_fcs'])
    cfg.train.eval_every = 0 if tiny else 400
    cfg.train.log_every = 10 if tiny else 50
    # The reference runs --no_eval; its validation file is MeCoVQA_Complex_VQA_test_rand200.json.
    cfg.evals.held_out = held_out({'complex': 'MeCoVQA_Complex_VQA_test_rand200.json'} if not tiny
                                  else ('complex', 'region'), demo=tiny)
    return apply_hw(cfg, a.hw, a.remat)  # hw= preset: mesh, micro-batch, remat (configs/common.py)
