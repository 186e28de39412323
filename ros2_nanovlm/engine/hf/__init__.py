"""The transformers/PyTorch backend. Importing it sets the Hugging Face offline flags: the engine
loads models from local directories only and never touches a network."""

import os

for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_flag, "1")
