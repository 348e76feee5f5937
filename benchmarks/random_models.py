"""The benchmarks' `--model` names for real Stable Diffusion architectures with random weights.

Speed does not depend on the weight values, so the benchmarks build each family's full-size model from its configs
(`semantic_aug.core.stable_diffusion`) once into the model cache instead of downloading it.
"""

from __future__ import annotations

import torch

from semantic_aug.core.stable_diffusion import (random_sd2_folder, random_sd_v1_folder, random_sdxl_folder,
                                                resolve_model_path)

RANDOM_SD, RANDOM_SD2, RANDOM_SDXL = "sd-v1-random", "sd2-random", "sdxl"
RANDOM_MODELS = {  # --model name -> (the architecture, its particulars, the builder of its cached folder)
    RANDOM_SD: ("SD v1.4", "512²", random_sd_v1_folder),
    RANDOM_SD2: ("SD 2.1", "v-prediction, 768²", random_sd2_folder),
    RANDOM_SDXL: ("SDXL base", "1024²", random_sdxl_folder),
}
MODEL_HELP = ", ".join(f"`{name}` ({architecture} architecture, random weights, {particulars})"
                       for name, (architecture, particulars, _) in RANDOM_MODELS.items()) + \
    " (built once into the model cache), an embedded tiny model (`tiny`, `tiny-sd2`, `tiny-sdxl`: smoke tests), " \
    "or a diffusers model folder"


def model_folder(name: str, device: str | torch.device) -> str:
    """The folder `--model` names: a random-weight architecture built into the cache on first use (on `device`),
    else the embedded or given model's folder."""
    if name in RANDOM_MODELS:
        return str(RANDOM_MODELS[name][2](device))
    return str(resolve_model_path(name))
