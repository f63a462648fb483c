"""Configs: sizes, arg strings, `--config.x=` overrides, and clear errors for wrong keys."""
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

import configs
from configs.common import get_config, parse_arg
from medplib_jax.models.clip import CLIPVisionConfig
from medplib_jax.models.llama import LlamaConfig

CONFIG_FILE = os.path.join(os.path.dirname(configs.__file__), 'common.py')


def test_sizes_build_model_configs():
    tiny = get_config()
    assert LlamaConfig.from_model_config(tiny.model).num_kv_heads == 2
    big = get_config('model=7b,dtype=bfloat16,scan=True,remat=full')
    llm = LlamaConfig.from_model_config(big.model)
    assert (llm.num_layers, llm.hidden_size, llm.intermediate_size, llm.vocab_size) == (32, 4096, 11008, 32267)
    assert (llm.dtype, llm.scan_layers, llm.remat_policy) == ('bfloat16', True, 'full')
    vis = CLIPVisionConfig.from_model_config(big.model)
    assert (vis.image_size, vis.patch_size, vis.num_layers, vis.select_layer) == (336, 14, 24, -2)


def test_arg_string_errors():
    with pytest.raises(ValueError, match="config arg 'size': unknown key"):
        get_config('size=7b')
    with pytest.raises(ValueError, match="model='9b'"):
        get_config('model=9b')
    with pytest.raises(ValueError, match='expected a bool'):
        parse_arg('scan=maybe', scan=False)
    with pytest.raises(ValueError, match='key=value'):
        parse_arg('scan', scan=False)


def test_command_line_overrides(monkeypatch):
    argv = ['prog', f'--config={CONFIG_FILE}:model=7b', '--config.model.llm.num_layers=3', '--config.mesh.fsdp=4',
            '--config.model.dtype=bfloat16']
    monkeypatch.setattr(sys, 'argv', argv)  # config_flags registers the override flags from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', CONFIG_FILE, flag_values=fv, lock_config=True)
    fv(argv)
    cfg = fv.config
    assert cfg.model.llm.num_layers == 3 and cfg.model.llm.hidden_size == 4096
    assert cfg.mesh.fsdp == 4 and cfg.model.dtype == 'bfloat16'
    assert LlamaConfig.from_model_config(cfg.model).num_layers == 3


def test_unknown_model_keys_are_rejected():
    cfg = get_config()
    cfg.unlock()
    cfg.model.llm.num_expertz = 2
    with pytest.raises(ValueError, match=r"config.model.llm: unknown keys \['num_expertz'\]"):
        LlamaConfig.from_model_config(cfg.model)
    cfg.model.vision.patchsize = 3
    with pytest.raises(ValueError, match=r"config.model.vision: unknown keys \['patchsize'\]"):
        CLIPVisionConfig.from_model_config(cfg.model)
    cfg.model.dtype = 'float8'
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        LlamaConfig.from_model_config({**cfg.model, 'llm': dict(get_config().model.llm)})


@pytest.mark.parametrize('stage', ['stage1', 'stage2', 'stage3', 'stage4'])
def test_stage_configs_compute_7b_in_bf16_and_tiny_in_fp32_with_fp32_master_weights(stage):
    """The reference trains the 7B model in bf16 (DeepSpeed bf16) with fp32 master weights; the tiny CPU model stays
    fp32; `dtype=` overrides either, and no preset touches the parameter dtype."""
    import importlib
    get = importlib.import_module(f'configs.{stage}').get_config
    for arg, dtype in (('model=7b', 'bfloat16'), ('model=7b,hw=v5p-64', 'bfloat16'),
                       ('model=7b,dtype=float32', 'float32'), ('model=tiny', 'float32'),
                       ('model=tiny,dtype=bfloat16', 'bfloat16')):
        model = get(arg).model
        assert (model.dtype, model.param_dtype) == (dtype, 'float32'), arg


def test_tpu_presets_pick_the_kernel_by_platform_and_the_default_is_the_einsum_one():
    from configs import stage4
    assert stage4.get_config('model=7b').model.llm.attention == 'xla'
    assert stage4.get_config('model=7b,hw=8xh100').model.llm.attention == 'xla'
    assert stage4.get_config('model=7b').model.moe.dispatch == 'einsum'  # the reference's; the GPU preset's too
    assert stage4.get_config('model=7b,hw=8xh100').model.moe.dispatch == 'einsum'
    for hw in ('v5p-64', 'v5p-256'):  # the splash kernel on TPU (tests/test_compile_check.py compiles it)
        cfg = stage4.get_config(f'model=7b,hw={hw}').model
        assert cfg.llm.attention == 'auto' and cfg.moe.dispatch == 'grouped'
    with pytest.raises(ValueError, match=r"^model.llm.attention='flash'; known: \['xla', 'splash', 'cudnn', 'auto'\]$"):
        from medplib_jax.models.config import LlamaConfig
        LlamaConfig.from_model_config(dict(get_config().model, llm=dict(get_config().model.llm, attention='flash')))
