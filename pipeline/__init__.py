"""lldm-dpo: Direct Preference Optimization for masked diffusion language models."""

import logging

__version__ = "0.1.0"

# Hub-kernel notices that are noise here (this project never fetches kernels from a hub), kept off every
# command's output: bitsandbytes' CPU backend says at import that an optional hub kernel package is absent
# (peft imports it whenever it is installed), and transformers' `kernels` loader says that offline mode skips
# a publisher check. Set here, in the package every command imports first, so no path misses it.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
