"""One loader for Stable Diffusion, used by every script.

`tiny` names an embedded, randomly initialised model with the SD v1.x architecture (UNet, VAE, CLIP text
encoder, PNDM/DDPM scheduler) at toy width, paired with the real SD1.x CLIP tokenizer shipped in
`semantic_aug/assets/sd1_tokenizer`. It is built once from configs (seeded, so every machine gets the same
weights) and saved as a normal diffusers folder, so it loads through exactly the same `from_pretrained` path
as `CompVis/stable-diffusion-v1-4` or any local diffusers folder. Its images are noise: it exists so that
every script runs end to end on a CPU in seconds.

`tiny-sd2` is its SD 2.x counterpart, with what sets SD 2.x apart from SD 1.x in diffusers' configs: the text
encoder's exact `gelu` (OpenCLIP) instead of `quick_gelu`, the tokenizer's pad token `!`, a UNet with linear
attention projections and a constant attention head width, and a v-prediction DDIM scheduler (as
`stabilityai/stable-diffusion-2-1`). It runs through the same pipeline classes as SD 1.x, as SD 2.x does.

`tiny-sdxl` is the same for Stable Diffusion XL: two CLIP text encoders (the second with a projection, whose pooled
output conditions the UNet), two tokenizers from the shipped vocabulary (the second pads with "!", as SDXL's does),
a UNet with SDXL's added text/time conditioning, and SDXL's Euler scheduler. `semantic_aug.core.model_family`
tells the families apart from the saved folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from semantic_aug.core.model_family import describe_family, detect_family
from semantic_aug.core.utils import UserError

TINY_MODEL_NAME = "tiny"
TINY_SD2_MODEL_NAME = "tiny-sd2"
TINY_SD2_MODEL_VERSION = "1"  # bump when the tiny-sd2 configs change, so caches rebuild
SD2_PAD_TOKEN = "!"  # SD 2.x pads prompts with "!" (id 0), SD 1.x with its end token
TINY_MODEL_SEED = 0
TINY_MODEL_VERSION = "2"  # bump when the tiny configs change, so caches rebuild
TINY_SDXL_MODEL_NAME = "tiny-sdxl"
TINY_SDXL_MODEL_VERSION = "1"  # bump when the tiny SDXL configs change, so caches rebuild
TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "sd1_tokenizer"
CLIP_MAX_LENGTH = 77  # SD1.x text context; transformers 5 needs it explicit or padding overflows
VAE_SCALING_FACTOR = 0.18215  # SD v1 latent scale
# SD v1.4's noise schedule; PNDM (without its Runge-Kutta warm-up) is its inference scheduler
SD_V1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                       skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
# SD 2.1's: the same noise schedule, DDIM, and a UNet that predicts the velocity v instead of the noise
SD_V2_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                       clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")

VAE_SCALING_FACTOR_XL = 0.13025  # SDXL's latent scale
SDXL_PAD_TOKEN = "!"  # the second SDXL tokenizer pads with "!" where the first pads with <|endoftext|>
# SDXL base's noise schedule and inference scheduler (Euler, "leading" spacing)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                      prediction_type="epsilon")
SDXL_TIME_IDS = 6  # the UNet's size/crop conditioning: original (h, w), crop top-left (y, x), target (h, w)


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


def load_tokenizer(path: str | os.PathLike = TOKENIZER_DIR, **kwargs):
    """The SD1.x CLIP tokenizer (from a model folder's `tokenizer/` or the shipped files); `kwargs` override its
    settings (`pad_token="!"` gives SD 2.x's)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), model_max_length=CLIP_MAX_LENGTH, **kwargs)


@contextlib.contextmanager
def seeded_init(seed: int = TINY_MODEL_SEED):
    """Random weights drawn from `seed`; torch's global generator is left as it was."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(generator_state)


def clip_text_config(tokenizer, **sizes):
    """A CLIP text encoder config for `tokenizer` (its vocabulary and special tokens, SD's 77 positions)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_LENGTH,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **sizes)


def tiny_vae(scaling_factor: float = VAE_SCALING_FACTOR):
    """The tiny models' two-level VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=64,
        scaling_factor=scaling_factor)


def full_vae(sample_size: int, scaling_factor: float, **extra):
    """Stable Diffusion's four-level VAE at full size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=sample_size, scaling_factor=scaling_factor, **extra)


def build_tiny_stable_diffusion(output_dir: str | os.PathLike) -> Path:
    """Build the tiny random SD-architecture pipeline from configs and save it as a diffusers folder.

    Latents are 4×32×32 for 64×64 images (two VAE blocks give a downsampling factor of 2); the text encoder
    is 32 wide with the full 49408-token CLIP vocabulary, so learned embeddings are 32-dimensional.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer()
    with seeded_init(TINY_MODEL_SEED):
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = tiny_vae(VAE_SCALING_FACTOR)
        text_encoder = CLIPTextModel(clip_text_config(
            tokenizer, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            projection_dim=32))
    return save_stable_diffusion(output_dir, tokenizer, text_encoder, vae, unet)


def build_tiny_sd2(output_dir: str | os.PathLike) -> Path:
    """Build the tiny random SD 2.x-architecture pipeline from configs and save it as a diffusers folder.

    Sizes are `tiny`'s, except a 64-wide text encoder (so its tokens cannot be mixed up with `tiny`'s 32-wide ones);
    the SD 2.x traits are listed in the module docstring. Attention heads are 16 wide in every block, as SD 2.x's
    are 64 wide (`attention_head_dim` gives the head count per block, 5/10/20/20 in SD 2.x).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer(pad_token=SD2_PAD_TOKEN)
    with seeded_init(TINY_MODEL_SEED):
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
        vae = tiny_vae(VAE_SCALING_FACTOR)
        text_encoder = CLIPTextModel(clip_text_config(
            tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            hidden_act="gelu", projection_dim=64))
    return save_stable_diffusion(output_dir, tokenizer, text_encoder, vae, unet,
                                 scheduler=DDIMScheduler(**SD_V2_SCHEDULER))


def save_stable_diffusion(output_dir: str | os.PathLike, tokenizer, text_encoder, vae, unet, scheduler=None) -> Path:
    """Save SD parts as a diffusers folder, atomically (a folder that another process finished first is kept).

    Args:
        scheduler: the inference scheduler; None is SD v1.4's PNDM.

    Returns:
        `output_dir`.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(**SD_V1_SCHEDULER) if scheduler is None else scheduler
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _save_pipeline(pipe, output_dir, ("tokenizer",))


def _save_pipeline(pipe, output_dir: str | os.PathLike, tokenizer_folders: tuple[str, ...]) -> Path:
    """Save a pipeline as a diffusers folder, atomically (a folder that another process finished first is kept)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        for folder in tokenizer_folders:
            for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files SD v1.4 ships
                shutil.copy(TOKENIZER_DIR / name, staging / folder / name)
        if tokenizer_folders == ("tokenizer",):
            shutil.copy(TOKENIZER_DIR / "special_tokens_map.json", staging / "tokenizer" / "special_tokens_map.json")
            if pipe.tokenizer.pad_token != "<|endoftext|>":  # SD 2.x: the special-token map names its own pad token
                special_tokens = json.loads((TOKENIZER_DIR / "special_tokens_map.json").read_text())
                special_tokens["pad_token"] = pipe.tokenizer.pad_token
                (staging / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2))
        if output_dir.exists():  # another process finished first; keep its copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def load_tokenizer_2(path: str | os.PathLike = TOKENIZER_DIR):
    """SDXL's second tokenizer: the same CLIP vocabulary, padding with "!" (from `tokenizer_2/` or the shipped files)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), model_max_length=CLIP_MAX_LENGTH, pad_token=SDXL_PAD_TOKEN)


def sdxl_unet_config(width: int, addition_time_embed_dim: int, pooled_dim: int) -> dict:
    """The UNet keys that make a UNet2DConditionModel take SDXL's added conditioning: the pooled text embedding
    (`pooled_dim` wide) and the six size/crop numbers, each as an `addition_time_embed_dim`-wide sinusoid."""
    return dict(cross_attention_dim=width, addition_embed_type="text_time",
                addition_time_embed_dim=addition_time_embed_dim,
                projection_class_embeddings_input_dim=addition_time_embed_dim * SDXL_TIME_IDS + pooled_dim,
                use_linear_projection=True)


def build_tiny_sdxl(output_dir: str | os.PathLike) -> Path:
    """Build the tiny random SDXL-architecture pipeline from configs and save it as a diffusers folder.

    As `tiny`: 64×64 images, 4×32×32 latents. Both text encoders are 32 wide (learned tokens are 32-dimensional in
    each), so the UNet's cross-attention reads their 64-wide concatenation; the second encoder's pooled projection
    is 32 wide.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = load_tokenizer(), load_tokenizer_2()
    width, pooled_dim = 32, 32
    with seeded_init(TINY_MODEL_SEED):
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=32,
            **sdxl_unet_config(2 * width, addition_time_embed_dim=8, pooled_dim=pooled_dim))
        vae = tiny_vae(VAE_SCALING_FACTOR_XL)
        encoders = []
        for model_class, act in ((CLIPTextModel, "quick_gelu"), (CLIPTextModelWithProjection, "gelu")):
            encoders.append(model_class(clip_text_config(
                tokenizer, hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                hidden_act=act, projection_dim=pooled_dim)))
    return save_stable_diffusion_xl(output_dir, tokenizer, tokenizer_2, *encoders, vae, unet)


def save_stable_diffusion_xl(output_dir: str | os.PathLike, tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae,
                             unet) -> Path:
    """Save SDXL parts with SDXL's Euler scheduler as a diffusers folder, atomically. As SDXL base, the empty
    negative prompt is zeros (`force_zeros_for_empty_prompt`) and no aesthetic score conditions the UNet.

    Returns:
        `output_dir`.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    return _save_pipeline(pipe, output_dir, ("tokenizer", "tokenizer_2"))


def resolve_model_path(name_or_path: str) -> str:
    """Turn `--pretrained_model_name_or_path` into something `from_pretrained` takes.

    `tiny` and `tiny-sd2` become their cached model folders (built on first use); an existing folder is used as it is;
    anything that looks like a file-system path but does not exist is an error; the rest is a hub id.
    """
    if name_or_path == TINY_MODEL_NAME:
        path = cache_root() / f"tiny-sd-v{TINY_MODEL_VERSION}"
        if not (path / "model_index.json").is_file():
            build_tiny_stable_diffusion(path)
        return str(path)
    if name_or_path == TINY_SD2_MODEL_NAME:
        path = cache_root() / f"tiny-sd2-v{TINY_SD2_MODEL_VERSION}"
        if not (path / "model_index.json").is_file():
            build_tiny_sd2(path)
        return str(path)
    if name_or_path == TINY_SDXL_MODEL_NAME:
        path = cache_root() / f"tiny-sdxl-v{TINY_SDXL_MODEL_VERSION}"
        if not (path / "model_index.json").is_file():
            build_tiny_sdxl(path)
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
    if detect_family(resolve_model_path(name_or_path)) == "sdxl":
        return _load_stable_diffusion_xl(name_or_path, pipeline, device, dtype)
    pipe = _from_pretrained(classes[pipeline].from_pretrained, name_or_path, dtype=dtype, safety_checker=None,
                            requires_safety_checker=False)
    pipe.tokenizer.model_max_length = CLIP_MAX_LENGTH
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_stable_diffusion_xl(name_or_path: str, pipeline: str, device, dtype):
    """`load_stable_diffusion` for an SDXL folder: diffusers' SDXL pipeline of the same kind."""
    from diffusers import (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline)

    classes = {"text2img": StableDiffusionXLPipeline, "img2img": StableDiffusionXLImg2ImgPipeline,
               "inpaint": StableDiffusionXLInpaintPipeline}
    pipe = _from_pretrained(classes[pipeline].from_pretrained, name_or_path, dtype=dtype)
    pipe.tokenizer.model_max_length = pipe.tokenizer_2.model_max_length = CLIP_MAX_LENGTH
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


def load_sdxl_second_encoder(name_or_path: str, revision: str | None = None):
    """SDXL's second text encoder (with its pooled projection) and tokenizer: (tokenizer_2, text_encoder_2)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {"revision": revision} if revision else {}
    tokenizer_2 = _from_pretrained(CLIPTokenizer.from_pretrained, path, subfolder="tokenizer_2",
                                   model_max_length=CLIP_MAX_LENGTH, **kwargs)
    text_encoder_2 = _from_pretrained(CLIPTextModelWithProjection.from_pretrained, path, subfolder="text_encoder_2",
                                      **kwargs)
    return tokenizer_2, text_encoder_2


def vae_scale_factor(vae) -> int:
    """Image pixels per latent along a side: 2 for each VAE level after the first (8 for SD, 2 for `tiny`)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def default_resolution(unet, vae) -> int:
    """Native image side of a model: 512 for SD v1.x, 64 for `tiny`."""
    return int(unet.config.sample_size * vae_scale_factor(vae))


def checked_resolution(resolution: int | None, unet, vae) -> int:
    """The image side to train or generate at: `resolution`, or the model's native side when None or 0.

    Raises:
        UserError: a side that the VAE's latents cannot tile (not a multiple of `vae_scale_factor`).
    """
    resolution = int(resolution or default_resolution(unet, vae))
    factor = vae_scale_factor(vae)
    if resolution % factor:
        raise UserError(f"--resolution {resolution} must be a multiple of {factor} for this model's VAE")
    return resolution


# the UNet blocks SD 1.x and 2.x share: four levels, cross-attention in the first three
SD_UNET_LAYOUT = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def build_random_sd_v1(device: str | torch.device = "cpu", seed: int = 0):
    """Stable Diffusion v1.4's architecture at full size with random weights, for benchmarks (speed does not
    depend on the weight values, and nothing needs downloading).

    The configs are those of `CompVis/stable-diffusion-v1-4`: UNet 320/640/1280/1280 channels, 2 layers per block,
    8 attention heads, 768-wide cross-attention on 64×64 latents; the 4-level VAE; the CLIP ViT-L/14 text encoder
    (768 wide, 12 layers, 12 heads); the DDPM training schedule. Parameters are created directly on `device`.

    Returns:
        (tokenizer, text_encoder, vae, unet, noise_scheduler), as `load_sd_components` returns them.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer()
    with seeded_init(seed):
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=64, **SD_UNET_LAYOUT, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
            vae = full_vae(512, VAE_SCALING_FACTOR)
            text_encoder = CLIPTextModel(clip_text_config(
                tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768))
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


def build_random_sd2(device: str | torch.device = "cpu", seed: int = 0):
    """Stable Diffusion 2.1's architecture at full size with random weights, for benchmarks.

    The configs are those of `stabilityai/stable-diffusion-2-1`: UNet 320/640/1280/1280 channels, 2 layers per
    block, 64-wide attention heads (5/10/20/20 per block) with linear projections and upcast attention, 1024-wide
    cross-attention on 96×96 latents for 768² images; the 4-level VAE; the OpenCLIP ViT-H/14 text encoder (1024
    wide, 23 layers, 16 heads, exact GELU); the v-prediction DDIM scheduler. Parameters are created directly on
    `device`.

    Returns:
        (tokenizer, text_encoder, vae, unet, scheduler).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = load_tokenizer(pad_token=SD2_PAD_TOKEN)
    with seeded_init(seed):
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=96, **SD_UNET_LAYOUT, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True, norm_num_groups=32)
            vae = full_vae(768, VAE_SCALING_FACTOR)
            text_encoder = CLIPTextModel(clip_text_config(
                tokenizer, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", projection_dim=512))
    return tokenizer, text_encoder, vae, unet, DDIMScheduler(**SD_V2_SCHEDULER)


def random_sd2_folder(device: str | torch.device = "cpu") -> Path:
    """`build_random_sd2` saved in fp16 as a diffusers folder under `cache_root()` (built on first use, on `device`),
    for the benchmarks that load a model by path."""
    path = cache_root() / "sd-2.1-random"
    if not (path / "model_index.json").is_file():
        tokenizer, text_encoder, vae, unet, scheduler = build_random_sd2(device)
        save_stable_diffusion(path, tokenizer, *(part.to(torch.float16) for part in (text_encoder, vae, unet)),
                              scheduler=scheduler)
    return path


def build_random_sdxl(device: str | torch.device = "cpu", seed: int = 0):
    """Stable Diffusion XL base's architecture at full size with random weights, for benchmarks.

    The configs are those of `stabilityai/stable-diffusion-xl-base-1.0`: UNet 320/640/1280 channels with 1, 2 and
    10 transformer layers per block, 2048-wide cross-attention (CLIP ViT-L 768 + OpenCLIP bigG 1280) on 128×128
    latents for 1024² images, the added text/time conditioning (256-wide time ids, 1280-wide pooled embedding); the
    4-level VAE; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders; the Euler scheduler. Parameters are created
    directly on `device`.

    Returns:
        (tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, scheduler).
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = load_tokenizer(), load_tokenizer_2()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, max_position_embeddings=CLIP_MAX_LENGTH,
                   vocab_size=len(tokenizer))
    with seeded_init(seed):
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), norm_num_groups=32,
                **sdxl_unet_config(2048, addition_time_embed_dim=256, pooled_dim=1280))
            vae = full_vae(1024, VAE_SCALING_FACTOR_XL, force_upcast=True)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768, **special))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280, **special))
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, scheduler


def random_sdxl_folder(device: str | torch.device = "cpu") -> Path:
    """`build_random_sdxl` saved in fp16 as a diffusers folder under `cache_root()` (built on first use, on
    `device`), for the benchmarks that load a model by path."""
    path = cache_root() / "sdxl-base-random"
    if not (path / "model_index.json").is_file():
        tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, _ = build_random_sdxl(device)
        save_stable_diffusion_xl(path, tokenizer, tokenizer_2,
                                 *(part.to(torch.float16) for part in (text_encoder, text_encoder_2, vae, unet)))
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
        A namespace with `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler` and `config` (with SDXL also
        `text_encoder_2` and `tokenizer_2`), as a pipeline has them.
    """
    import importlib
    import json
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(resolve_model_path(name_or_path))
    if not folder.is_dir():  # a hub id: the folder `from_pretrained` reads (downloaded once, as it would be)
        from diffusers import DiffusionPipeline

        folder = Path(_from_pretrained(DiffusionPipeline.download, name_or_path))
    index = json.loads((folder / "model_index.json").read_text())
    family = describe_family(folder)  # which text encoders and tokenizers the folder has
    parts = {}
    with torch.device("meta"):
        for name, loader in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            model = loader.from_config(loader.load_config(folder / name))
            model.register_to_config(_name_or_path=str(folder / name))
            parts[name] = model  # a diffusers config records no dtype
        # SDXL's second encoder is the one with the projection (its pooled output conditions the UNet)
        encoders = list(zip(family.text_encoders, (CLIPTextModel, CLIPTextModelWithProjection)))
        for name, model_class in encoders:
            config = CLIPTextConfig.from_pretrained(folder / name)
            config.dtype = dtype
            parts[name] = model_class(config).to(dtype)
    for name, _ in encoders:
        parts[name].config._name_or_path = str(folder / name)
    library, class_name = index["scheduler"]
    scheduler_class = getattr(importlib.import_module(library), class_name)
    parts["scheduler"] = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    for name in family.tokenizers:
        parts[name] = load_tokenizer(folder / name)
    parts["config"] = {key: value for key, value in index.items() if not isinstance(value, list)}  # pipeline flags
    return SimpleNamespace(**parts)
