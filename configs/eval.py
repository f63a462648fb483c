"""`medplib-jax eval`'s config: where the paper's evaluators find their records and how they decode. The model
always comes from the checkpoint (its params directory's JSON), never from here.

    medplib-jax eval --checkpoint=outputs/demo/stage4                       # the demo's synthetic test split
    medplib-jax eval --checkpoint=runs/stage4 --config=configs/eval.py:data=mecovqa \\
      --config.data.root=/data/MeCoVQA --config.data.image_folder=/data/SAMed2Dv1 --evals=mecovqa_g \\
      --config.evals.mecovqa_g.max_records=500 --config.data.tokenizer=/ckpt/llava-v1.5-7b

arg keys: data (demo: the synthetic test files under outputs/demo_data | mecovqa: the reference's test file names
under config.data.root). `config.data.tokenizer` '' = the one the checkpoint's config names. Each evaluator's
fields are EvalSettings' (medplib_jax/eval/evaluators.py); `config.data`'s are the pipeline's (only root,
image_folder, tokenizer, strict, largest_component and check_duplicate_ids matter here).
"""
import ml_collections as mlc

from configs.common import data_config, paper_evals, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, data='demo')
    cfg = mlc.ConfigDict()
    cfg.data = data_config('tiny', 'none')
    cfg.data.root = 'outputs/demo_data' if a.data == 'demo' else ''
    cfg.data.tokenizer = ''  # the checkpoint's
    cfg.evals = paper_evals(a.data)
    return cfg
