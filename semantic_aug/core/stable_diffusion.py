"""One loader for Stable Diffusion, used by every script.

`tiny` names an embedded, randomly initialised model with the SD v1.x architecture (UNet, VAE, CLIP text
encoder, PNDM/DDPM scheduler) at toy width, paired with the real SD1.x CLIP tokenizer shipped in
`semantic_aug/assets/sd1_tokenizer`. It is built once from configs (seeded, so every machine gets the same
weights) and saved as a normal diffusers folder, so it loads through exactly the same `from_pretrained` path
as `CompVis/stable-diffusion-v1-4` or any local diffusers folder. Its images are noise: it exists so that
every script runs end to end on a CPU in seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from semantic_aug.core.utils import UserError

TINY_MODEL_NAME = "tiny"
TINY_MODEL_SEED = 0
TINY_MODEL_VERSION = "2"  # bump when the tiny configs change, so caches rebuild
TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "sd1_tokenizer"
CLIP_MAX_LENGTH = 77  # SD1.x text context; transformers 5 needs it explicit or padding overflows
VAE_SCALING_FACTOR = 0.18215  # SD v1 latent scale
# SD v1.4's noise schedule; PNDM (without its Runge-Kutta warm-up) is its inference scheduler
SD_V1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                       skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def cache_root() -> Path:
    """Where built models are cached: `$DIAGEN_CACHE`, else `~/.cache/diagen`."""
    return Path(os.environ.get("DIAGEN_CACHE", Path.home() / ".cache" / "diagen")).expanduser()


def enable_compile_cache() -> Path:
    """Keep `torch.compile`'s generated code on disk under `cache_root()/torch-compile`, so that every run after the
    first (the next run of an experiment grid, a rerun) loads the compiled UNet instead of generating it again. A
    folder set in `TORCHINDUCTOR_CACHE_DIR` is kept. Call it once, from a script, before compiling.

    Returns:
        The cache folder.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # importing diffusers already fills the variable with PyTorch's default (a /tmp folder): replace only that
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "torch-compile")
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    inductor_config.fx_graph_cache = True  # Inductor's compiled graphs
    functorch_config.enable_autograd_cache = True  # the traced forward/backward graphs around them
    return folder


def load_tokenizer(path: str | os.PathLike = TOKENIZER_DIR):
    """The SD1.x CLIP tokenizer (from a model folder's `tokenizer/` or the shipped files)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), model_max_length=CLIP_MAX_LENGTH)


def build_tiny_stable_diffusion(output_dir: str | os.PathLike) -> Path:
    """Build the tiny random SD-architecture pipeline from configs and save it as a diffusers folder.

    Latents are 4×32×32 for 64×64 images (two VAE blocks give a downsampling factor of 2); the text encoder
    is 32 wide with the full 49408-token CLIP vocabulary, so learned embeddings are 32-dimensional.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(TINY_MODEL_SEED)
    try:
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=64,
            scaling_factor=VAE_SCALING_FACTOR)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32))
    finally:
        torch.random.set_rng_state(generator_state)
    return save_stable_diffusion(output_dir, tokenizer, text_encoder, vae, unet)


def save_stable_diffusion(output_dir: str | os.PathLike, tokenizer, text_encoder, vae, unet) -> Path:
    """Save SD v1.x parts with SD v1.4's PNDM inference scheduler as a diffusers folder, atomically (a folder that
    another process finished first is kept).

    Returns:
        `output_dir`.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD_V1_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):  # the slow-tokenizer files SD v1.4 ships
            shutil.copy(TOKENIZER_DIR / name, staging / "tokenizer" / name)
        if output_dir.exists():  # another process finished first; keep its copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def resolve_model_path(name_or_path: str) -> str:
    """Turn `--pretrained_model_name_or_path` into something `from_pretrained` takes.

    `tiny` becomes the cached tiny model folder (built on first use); an existing folder is used as it is;
    anything that looks like a file-system path but does not exist is an error; the rest is a hub id.
    """
    if name_or_path == TINY_MODEL_NAME:
        path = cache_root() / f"tiny-sd-v{TINY_MODEL_VERSION}"
        if not (path / "model_index.json").is_file():
            build_tiny_stable_diffusion(path)
        return str(path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise UserError(f"model folder {path} is not a diffusers Stable Diffusion folder (no model_index.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep + os.sep in name_or_path:
        raise UserError(f"model path does not exist: {name_or_path}")
    return name_or_path


def _from_pretrained(loader, name_or_path: str, **kwargs):
    try:
        return loader(resolve_model_path(name_or_path), **kwargs)
    except (OSError, EnvironmentError) as error:
        raise UserError(f"cannot load model {name_or_path!r}: not a local folder and not reachable on the "
                        f"Hugging Face hub ({type(error).__name__}); use 'tiny' offline or pass a local diffusers folder") from None


def load_stable_diffusion(name_or_path: str = TINY_MODEL_NAME, pipeline: str = "text2img", device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):
    """Load a Stable Diffusion pipeline (safety checker off, as in the reference).

    Args:
        name_or_path: `tiny`, a hub id such as `CompVis/stable-diffusion-v1-4`, or a local diffusers folder.
        pipeline: `text2img`, `img2img` or `inpaint`.
        device: where to put it.
        dtype: weight dtype (fp16/bf16 on GPU; fp32 on CPU).

    Returns:
        The diffusers pipeline, with the SD1.x tokenizer's `model_max_length` fixed to 77.
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    classes = {"text2img": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline,
               "inpaint": StableDiffusionInpaintPipeline}
    if pipeline not in classes:
        raise ValueError(f"pipeline must be one of {sorted(classes)}, got {pipeline!r}")
    pipe = _from_pretrained(classes[pipeline].from_pretrained, name_or_path, dtype=dtype, safety_checker=None,
                            requires_safety_checker=False)
    pipe.tokenizer.model_max_length = CLIP_MAX_LENGTH
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_sd_components(name_or_path: str = TINY_MODEL_NAME, revision: str | None = None):
    """The separate parts Textual Inversion trains with: (tokenizer, text_encoder, vae, unet, DDPM noise scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {"revision": revision} if revision else {}
    tokenizer = _from_pretrained(CLIPTokenizer.from_pretrained, path, subfolder="tokenizer",
                                 model_max_length=CLIP_MAX_LENGTH, **kwargs)
    text_encoder = _from_pretrained(CLIPTextModel.from_pretrained, path, subfolder="text_encoder", **kwargs)
    vae = _from_pretrained(AutoencoderKL.from_pretrained, path, subfolder="vae", **kwargs)
    unet = _from_pretrained(UNet2DConditionModel.from_pretrained, path, subfolder="unet", **kwargs)
    noise_scheduler = _from_pretrained(DDPMScheduler.from_pretrained, path, subfolder="scheduler", **kwargs)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def default_resolution(unet, vae) -> int:
    """Native image side of a model: 512 for SD v1.x, 64 for `tiny`."""
    return int(unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1))


def build_random_sd_v1(device: str | torch.device = "cpu", seed: int = 0):
    """Stable Diffusion v1.4's architecture at full size with random weights, for benchmarks (speed does not
    depend on the weight values, and nothing needs downloading).

    The configs are those of `CompVis/stable-diffusion-v1-4`: UNet 320/640/1280/1280 channels, 2 layers per block,
    8 attention heads, 768-wide cross-attention on 64×64 latents; the 4-level VAE; the CLIP ViT-L/14 text encoder
    (768 wide, 12 layers, 12 heads); the DDPM training schedule. Parameters are created directly on `device`.

    Returns:
        (tokenizer, text_encoder, vae, unet, noise_scheduler), as `load_sd_components` returns them.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=32, sample_size=512, scaling_factor=VAE_SCALING_FACTOR)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id))
    finally:
        torch.random.set_rng_state(generator_state)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def random_sd_v1_folder(device: str | torch.device = "cpu") -> Path:
    """`build_random_sd_v1` saved in fp16 as a diffusers folder under `cache_root()` (built on first use, on
    `device`), for the benchmarks that load a model by path."""
    path = cache_root() / "sd-v1.4-random"
    if not (path / "model_index.json").is_file():
        tokenizer, text_encoder, vae, unet, _ = build_random_sd_v1(device)
        save_stable_diffusion(path, tokenizer, *(part.to(torch.float16) for part in (text_encoder, vae, unet)))
    return path


def load_stable_diffusion_configs(name_or_path: str = TINY_MODEL_NAME, dtype: torch.dtype = torch.float32):
    """A Stable Diffusion pipeline's parts built from the model folder's configs on the meta device: no weights are
    read, so it takes a fraction of a second. Its configs, tokenizer and scheduler equal `load_stable_diffusion`'s
    (`_name_or_path` and the text encoder's dtype included), which is what a synthetic set's fingerprint reads;
    it cannot run.

    Args:
        name_or_path: as `load_stable_diffusion` takes it (a hub id resolves to its downloaded folder).
        dtype: the weight dtype `load_stable_diffusion` would load with (the text encoder's config records it).

    Returns:
        A namespace with `unet`, `vae`, `text_encoder`, `tokenizer` and `scheduler`, as a pipeline has them.
    """
    import importlib
    import json
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(resolve_model_path(name_or_path))
    if not folder.is_dir():  # a hub id: the folder `from_pretrained` reads (downloaded once, as it would be)
        from diffusers import DiffusionPipeline

        folder = Path(_from_pretrained(DiffusionPipeline.download, name_or_path))
    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    with torch.device("meta"):
        for name, loader in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            model = loader.from_config(loader.load_config(folder / name))
            model.register_to_config(_name_or_path=str(folder / name))
            parts[name] = model  # a diffusers config records no dtype
        config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
        config.dtype = dtype
        parts["text_encoder"] = CLIPTextModel(config).to(dtype)
    parts["text_encoder"].config._name_or_path = str(folder / "text_encoder")
    library, class_name = index["scheduler"]
    scheduler_class = getattr(importlib.import_module(library), class_name)
    parts["scheduler"] = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=CLIP_MAX_LENGTH)
    return SimpleNamespace(**parts)
