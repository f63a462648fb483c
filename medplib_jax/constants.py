"""Sentinel ids shared by the data pipeline, the model and the losses (the reference's values, utils/utils.py)."""
IGNORE_INDEX = -100  # label of an unsupervised position
IMAGE_TOKEN_INDEX = -200  # one per image token slot (the reference has one per image, expanded in the model)
REGION_TOKEN_INDEX = -300  # one between each <region> </region> pair
MASK_THRESHOLD = 0.1  # sigmoid threshold of a predicted mask (the reference's, not 0.5; logit about -2.197)
# A folder written by `make-demo-data` holds this file: data (and weights trained on it) are synthetic shapes.
SYNTHETIC_MARKER = '.medplib_synthetic'
# Shown by chat, serve and the reports wherever weights or records are the synthetic demo's.
DEMO_NOTICE = ('synthetic-data demo weights: a tiny model trained on synthetic shapes, not on medical images; '
               'not for clinical use')
# The reference's fixed image geometry: CLIP ViT-L/14-336's input side, its 24 x 24 patch grid (the region
# encoder's), and SAM-Med2D's input side.
CLIP_SIZE = 336
GRID = 24
SAM_SIZE = 256
# The answer-length limit of interactive asking (chat, serve, the predict API): the reference's chat.py.
CHAT_MAX_NEW_TOKENS = 512
