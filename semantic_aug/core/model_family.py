"""Which Stable Diffusion family a model folder holds, read from its files with no flag.

Three families, told apart by `model_index.json` and the component configs:

* `sdxl`: a second text encoder (`text_encoder_2` in `model_index.json`, or a `StableDiffusionXL...` pipeline
  class). Two CLIP text encoders and tokenizers; the UNet also takes the pooled text embedding of the second
  encoder and the size/crop conditioning (`addition_embed_type: "text_time"`); 1024 px for SDXL base.
* `sd2`: one OpenCLIP text encoder (`hidden_act: "gelu"`, where SD 1.x's CLIP uses `quick_gelu`), or a UNet with
  `use_linear_projection`; 768 px for SD 2.x, often with v-prediction.
* `sd1`: the rest of the Stable Diffusion folders (SD v1.x: one CLIP ViT-L/14 encoder, 512 px).

`describe_family` returns what the rest of the code reads: the family, its text encoders and tokenizers (the
folder names), and its native resolution (the UNet's `sample_size` × the VAE's downsampling factor).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from semantic_aug.core.utils import UserError

FAMILIES = ("sd1", "sd2", "sdxl")
SDXL_CROP_TOP_LEFT = (0, 0)  # no crop: the default `crops_coords_top_left` of diffusers' SDXL pipelines


@dataclass(frozen=True)
class ModelFamily:
    """What the code needs to know about a model folder's family.

    Attributes:
        name: `sd1`, `sd2` or `sdxl`.
        text_encoders: the text-encoder subfolders, in the order their states are concatenated.
        tokenizers: the matching tokenizer subfolders.
        resolution: the native image side in pixels.
    """

    name: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    resolution: int


def _read_json(folder: Path, relative: str) -> dict:
    """A JSON file of a model folder (local, or fetched from the hub cache for a hub id), or {} if absent."""
    path = folder / relative
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {path} ({type(error).__name__}); the model folder is damaged") from None
    return {}


def _model_folder(model_path: str | os.PathLike) -> Path:
    """A local folder that holds the model's configs: the folder itself, or a hub id's configs from the hub."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_path), allow_patterns=["model_index.json", "*/config.json"]))
    except Exception as error:  # noqa: BLE001 - offline, unknown id, no permission: one message for all
        raise UserError(f"cannot load model {str(model_path)!r}: not a local folder and its configs are "
                        f"not reachable on the Hugging Face hub ({type(error).__name__}); pass a local diffusers "
                        f"folder") from None


def describe_family(model_path: str | os.PathLike) -> ModelFamily:
    """Read a diffusers Stable Diffusion folder's family (see the module docstring).

    Args:
        model_path: a local diffusers folder (`resolve_model_path` turns `tiny` names into one) or a hub id.

    Returns:
        The `ModelFamily`.

    Raises:
        UserError: the folder is not a diffusers Stable Diffusion folder (no `model_index.json` with a UNet and a
            text encoder).
    """
    folder = _model_folder(model_path)
    index = _read_json(folder, "model_index.json")
    if "unet" not in index or "text_encoder" not in index:
        raise UserError(f"{model_path} is not a Stable Diffusion model folder: its model_index.json is missing or "
                        f"names no unet and text_encoder; pass a diffusers SD 1.x, SD 2.x or SDXL folder")
    unet = _read_json(folder, "unet/config.json")
    vae = _read_json(folder, "vae/config.json")
    text_encoder = _read_json(folder, "text_encoder/config.json")
    vae_factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    resolution = int(unet.get("sample_size", 64)) * vae_factor
    if "text_encoder_2" in index or str(index.get("_class_name", "")).startswith("StableDiffusionXL"):
        return ModelFamily("sdxl", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), resolution)
    name = "sd2" if text_encoder.get("hidden_act") == "gelu" or unet.get("use_linear_projection") else "sd1"
    return ModelFamily(name, ("text_encoder",), ("tokenizer",), resolution)


def detect_family(model_path: str | os.PathLike) -> str:
    """The family name of a model folder: `sd1`, `sd2` or `sdxl` (see `describe_family`)."""
    return describe_family(model_path).name


def sdxl_time_ids(side: int) -> tuple[int, ...]:
    """SDXL's size/crop micro-conditioning of a square `side`² image that was neither cropped nor resized from
    another size: (original height, width, crop top, left, target height, width)."""
    return (side, side) + SDXL_CROP_TOP_LEFT + (side, side)
