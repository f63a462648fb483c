"""The paper's evaluators' settings (`config.evals.<name>`) as a checked dataclass with each default, and the
reference's test files. Plain Python: a config file loads without JAX."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# The reference's test files by evaluator kind (MeCoVQA's and OmniMedVQA's release; `_rand200` / `_rand500` subsets
# of them exist too): the records the paper's tables were computed on.
REFERENCE_TEST_FILES = {'omnimedvqa': 'OmniMedVQA_OA.json', 'mecovqa_c': 'MeCoVQA_Complex_VQA_test.json',
                        'mecovqa_r': 'MeCoVQA_Region_VQA_test.json', 'mecovqa_g': 'MeCoVQA_Grounding_test.json'}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """`config.evals.<name>` of the paper's evaluators (besides `kind`).

    datasets: name -> configs.common.dataset(...): records files read in this order (relative to config.data.root).
    max_records: only the first N records of them (0 = all). batch_size: requests decoded together (1 = the
      reference's; a batch gives the same greedy answers, up to floating-point ties). max_new_tokens: the
      reference's 1024. system: 'train' (training's llava_v1 text) | 'reference_eval' (vqa_infer.py's "user"
      wording). every: training steps between runs (0 = config.train.eval_every).
    answer_type (mecovqa_c / mecovqa_r): '' = each record's `answer_type`, 'open' where it has none; else this
      type for every record (vqa_infer.py's `--answer_type`).
    score_turn: which answer of a multi-turn record the prediction is scored against: 'first' (the reference:
      vqa_infer.py writes the first assistant turn, `gts_list[0][0]`, as `gt`) | 'last' (the answer to the question
      asked, the last turn's). The prompt is the same either way: the earlier turns and the last question.
    qa_information (omnimedvqa): '' = each record's `modality_type`; else OmniMedVQA's `QA_information/Open-access`
      folder, whose JSON files (its subfolders included) give `modality_type` by `image_path`
      (cal_metric_omniMedVQA.py `get_name_type`; `qa_modalities`).
    qa_conflicts (omnimedvqa, with qa_information): an image listed more than once: 'first' (the reference: the
      first entry with a `modality_type` wins, files in sorted walk order) | 'error' (two different modality_types
      for one image are an error naming both files)."""
    datasets: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_records: int = 0
    batch_size: int = 1
    max_new_tokens: int = 1024
    system: str = 'train'
    every: int = 0
    answer_type: str = ''
    score_turn: str = 'first'
    qa_information: str = ''
    qa_conflicts: str = 'first'
