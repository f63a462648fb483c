"""The arrays `MedPLIBForCausalLM.forward` takes, by name: the model's half of the batch schema (data/batch.py
adds the training targets and bookkeeping). Plain Python, no JAX."""
MODEL_INPUTS = ('input_ids', 'clip_pixels', 'sam_pixels', 'region_grids', 'token_mask')
