"""Shared pieces of the training tests: the synthetic data, tiny stage configs, host batches, leaf comparisons."""
import importlib

import jax
import numpy as np

from medplib_jax.data.pipeline import make_iterator
from medplib_jax.data.synthetic import make_demo_data
from medplib_jax.train.trainable import flatten

STAGES = ('stage1', 'stage2', 'stage3', 'stage4')
# Trained leaves with no path to the loss (so no gradient, so no update), by design of the reference: the IoU
# head only feeds the IoU loss (weight 0 in stages III and IV), and hypernetwork MLPs 1-3 only feed the three
# multimask outputs that `multimask_output=False` drops.
NO_GRADIENT = ('model/visual_model/mask_decoder/iou_prediction_head/',
               'model/visual_model/mask_decoder/output_hypernetworks_mlps_1/',
               'model/visual_model/mask_decoder/output_hypernetworks_mlps_2/',
               'model/visual_model/mask_decoder/output_hypernetworks_mlps_3/')


def make_data(root, num_images=8):
    make_demo_data(str(root), num_images=num_images, seed=0)
    return str(root)


def stage_config(name, root, *, batch_size=4, **train):
    """A tiny stage config from configs/<name>.py with random init, on one device unless `cfg.mesh` is changed (see
    `devices`). Stage IV routes per sequence here (moe.group_size 1): the einsum MoE's cost grows with the routing
    group, and CPU tests are timed."""
    cfg = importlib.import_module(f'configs.{name}').get_config('model=tiny,init=random')
    cfg.mesh = dict(data=1, fsdp=1, tensor=1)
    cfg.data.root = root
    cfg.data.batch_size = batch_size
    if cfg.model.moe.mode != 'none':
        cfg.model.moe.group_size = 1
    for key, value in train.items():
        cfg.train[key] = value
    return cfg


def devices(cfg):
    """The first data x fsdp x tensor devices: the config's mesh on a subset of the 8 fake CPU devices."""
    m = cfg.mesh
    return jax.devices()[:m.data * m.fsdp * m.tensor]


def host_batch(cfg):
    """The first training batch of the config's mix (equal weights interleave the datasets row by row)."""
    it = make_iterator(cfg)
    try:
        return next(it)
    finally:
        it.close()


def leaves(params):
    return {k: np.asarray(v) for k, v in jax.device_get(flatten(params)).items()}
