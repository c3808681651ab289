"""lldm-dpo: Direct Preference Optimization for masked diffusion language models."""

import os as _os

__version__ = "0.1.0"

# Nothing is ever fetched from a model hub at run time: loading is local only,
# and a missing model fails at once instead of waiting on the network.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
