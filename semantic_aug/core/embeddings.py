"""Learned Textual Inversion tokens: names, files, loading into a text encoder, and `embedding_noise` (DIAGen a).

One token per class, `<class_name>` with spaces turned into `_` (`<cell_phone>`). DIAGen's contribution (a)
adds noisy copies `<class_name_σ>` = e + σ·N(0, I) for each standard deviation σ (absolute, not relative to
the embedding's norm), so that generation can pick between slightly different versions of a class concept.

File formats (compatible with the reference; where they live: `semantic_aug.core.layout.RunLayout`):
    per class:  `{fine_tuned_dir}/{class_}/learned_embeds.bin`, torch.save({"<class_>": [dim]})
                (+ `learned_embeds.safetensors`, the same dict, which diffusers' `load_textual_inversion` reads)
    merged:     `RunLayout.tokens()`, {"<class_>": [dim], ...}
    with noise: `RunLayout.tokens(noise=True)`, originals and `<class_σ>` per σ
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from semantic_aug.core.utils import UserError, atomic_torch_save, atomic_write_bytes

LEARNED_EMBEDS_NAME = "learned_embeds.bin"  # the reference's per-class file (torch.save of {token: tensor})
LEARNED_EMBEDS_SAFE_NAME = "learned_embeds.safetensors"  # the name diffusers' load_textual_inversion looks for
TOKEN_OPEN, TOKEN_CLOSE = "<", ">"


def class_folder_name(class_name: str) -> str:
    """The per-class folder and token stem: spaces become `_` (`cell phone` -> `cell_phone`)."""
    return class_name.replace(" ", "_")


def token_name(class_name: str) -> str:
    """The learned token of a class: `cell phone` -> `<cell_phone>`."""
    return f"{TOKEN_OPEN}{class_folder_name(class_name)}{TOKEN_CLOSE}"


def noisy_token_name(class_name: str, std: float) -> str:
    """The noisy variant of a class token for standard deviation `std`: (`cell phone`, 0.005) -> `<cell_phone_0.005>`.

    `std` is written as Python writes the float (`str(0.005)` == `0.005`), as the reference named them.
    """
    return f"{TOKEN_OPEN}{class_folder_name(class_name)}_{float(std)}{TOKEN_CLOSE}"


def _token_stem(token: str) -> str:
    if not (token.startswith(TOKEN_OPEN) and token.endswith(TOKEN_CLOSE) and len(token) > 2):
        raise ValueError(f"token {token!r} is not of the form <name>")
    return token[1:-1]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from `parts` (ints, strings, floats) that is the same on every machine and Python run.

    Python's `hash()` of strings is salted per process, so it cannot seed anything that must repeat.
    """
    digest = hashlib.sha256(repr(tuple(parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def embedding_noise(embeddings: Mapping[str, torch.Tensor], std_deviations: Sequence[float],
                    seed: int) -> dict[str, torch.Tensor]:
    """DIAGen (a): add noisy copies `<name_σ>` = e + σ·N(0, I) of every token, for each σ in `std_deviations`.

    Each (token, σ) gets its own generator seeded from (`seed`, noisy token name), so a token's noise does not
    depend on which other tokens are in the file or on their order, and reruns give the same file.

    Args:
        embeddings: token (`<name>`) -> embedding vector [dim].
        std_deviations: absolute noise standard deviations (the paper uses 0.005, 0.01, 0.025).
        seed: seeds every draw.

    Returns:
        A new dict with, per token in input order, the original followed by one noisy copy per σ.
    """
    noisy: dict[str, torch.Tensor] = {}
    for token, vector in embeddings.items():
        noisy[token] = vector.clone()
        for std in std_deviations:
            name = noisy_token_name(_token_stem(token), std)
            if name in embeddings:
                raise ValueError(f"noisy token {name} collides with an existing token; the file already holds noise")
            generator = torch.Generator().manual_seed(stable_seed(seed, name))
            draw = torch.randn(vector.shape, generator=generator, dtype=torch.float32)
            noisy[name] = (vector.float() + float(std) * draw).to(vector.dtype)
    return noisy


def _read_token_dict(path: Path) -> dict:
    """A dict from a torch (`.pt`/`.bin`) or safetensors file, or a `UserError` naming the file."""
    if not path.is_file():
        raise UserError(f"token file not found: {path} (run fine_tune.py and aggregate_embeddings.py first)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"malformed safetensors token file {path}: {error}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails on junk in many ways (IndexError for a text file, ...)
        raise UserError(f"malformed token file {path}: not a torch file ({type(error).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"malformed token file {path}: expected a dict token -> tensor, got {type(data).__name__}")
    return data


def load_tokens(path: str | os.PathLike, class_names: Sequence[str] | None = None,
                embedding_dim: int | None = None) -> dict[str, torch.Tensor]:
    """Read a token file (a dict token -> tensor [dim]; `[1, dim]` is flattened) and check it.

    Args:
        path: a `.pt`/`.bin` (torch.save) or `.safetensors` file.
        class_names: if given, every class must have its token `<class_>` (exact name match).
        embedding_dim: if given, every vector must have this width (the text encoder's hidden size).

    Returns:
        token -> float tensor [dim], in file order.

    Raises:
        UserError: missing file, not a torch/safetensors dict, non-tensor or multi-vector values, a class without
            its token, or the wrong width.
    """
    path = Path(path)
    data = _read_token_dict(path)
    tokens: dict[str, torch.Tensor] = {}
    for token, value in data.items():
        if not isinstance(token, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"malformed token file {path}: entry {token!r} is not a string -> tensor pair")
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise UserError(f"malformed token file {path}: token {token} has shape {tuple(value.shape)}, "
                            f"expected one vector [dim]")
        if embedding_dim is not None and value.shape[0] != embedding_dim:
            raise UserError(f"token {token} in {path} is {value.shape[0]} wide, but the text encoder expects "
                            f"{embedding_dim}; the tokens were learned with another model")
        tokens[token] = value
    if not tokens:
        raise UserError(f"token file {path} holds no tokens")
    for class_name in class_names or ():
        if token_name(class_name) not in tokens:
            raise UserError(f"token file {path} has no token {token_name(class_name)} for class {class_name!r}")
    return tokens


def save_tokens(tokens: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write token -> tensor atomically: torch.save for `.pt`/`.bin`, safetensors for `.safetensors`."""
    tensors = {token: vector.detach().to("cpu", torch.float32).contiguous() for token, vector in tokens.items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write_bytes(path, save(tensors))
    else:
        atomic_torch_save(tensors, path)


def save_learned_embeds(folder: str | os.PathLike, token: str, vector: torch.Tensor,
                        name: str = LEARNED_EMBEDS_NAME) -> None:
    """Write one class's learned token into `folder`: the reference `.bin`, and beside it the `.safetensors` copy.

    The `.bin` is written last: its presence marks the class as finished.
    """
    folder = Path(folder)
    if name == LEARNED_EMBEDS_NAME:
        save_tokens({token: vector}, folder / LEARNED_EMBEDS_SAFE_NAME)
    save_tokens({token: vector}, folder / name)


def collect_class_tokens(run_dir: str | os.PathLike, class_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Read every class's `{run_dir}/{class_}/learned_embeds.bin` into one dict `<class_>` -> vector, in class order.

    Raises:
        UserError: a missing run or class folder, a missing or malformed file, a file whose token is not exactly
            the class's token, or vectors of different widths.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no fine-tuned tokens in {run_dir}: the folder does not exist (run fine_tune.py first)")
    tokens: dict[str, torch.Tensor] = {}
    for class_name in class_names:
        folder = run_dir / class_folder_name(class_name)
        if not folder.is_dir():
            raise UserError(f"missing class directory {folder} for class {class_name!r}; "
                            f"rerun fine_tune.py to finish it")
        path = folder / LEARNED_EMBEDS_NAME
        if not path.is_file():
            raise UserError(f"class {class_name!r} is unfinished: {path} is missing; rerun fine_tune.py to finish it")
        expected = token_name(class_name)
        found = load_tokens(path)
        if list(found) != [expected]:
            raise UserError(f"{path} holds token(s) {', '.join(found)}, expected exactly {expected}")
        tokens[expected] = found[expected]
    widths = {vector.shape[0] for vector in tokens.values()}
    if len(widths) > 1:
        raise UserError(f"the class tokens in {run_dir} have different widths {sorted(widths)}; they come from "
                        f"different models")
    return tokens


def add_tokens_to_text_encoder(tokenizer, text_encoder, tokens: Mapping[str, torch.Tensor]) -> list[int]:
    """Add `tokens` to the tokenizer and write their vectors into the text encoder's input embedding.

    A token that an earlier call already added is reused (its vector overwritten); a token that is a word of
    the base vocabulary is refused, since overwriting it would change every prompt that uses the word.

    Args:
        tokenizer: a CLIP tokenizer.
        text_encoder: its CLIP text model.
        tokens: token -> vector [dim].

    Returns:
        The token ids, in the order of `tokens`.

    Raises:
        UserError: a token that is part of the base vocabulary, one that does not tokenize to exactly one id,
            or a vector of the wrong width.
    """
    width = text_encoder.get_input_embeddings().weight.shape[1]
    for token, vector in tokens.items():
        if vector.shape[-1] != width or vector.numel() != width:
            raise UserError(f"token {token} has shape {tuple(vector.shape)}, but the text encoder expects [{width}]; "
                            f"the tokens were learned with another model")
        if token in tokenizer.get_vocab() and token not in tokenizer.added_tokens_encoder:
            raise UserError(f"token {token} is already a word of the tokenizer's vocabulary; choose another name")
    tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, token_id in zip(tokens, ids):
        encoded = tokenizer(token, add_special_tokens=False).input_ids
        if encoded != [token_id]:
            raise UserError(f"token {token} does not tokenize to one id (got {encoded}); use a name without spaces")
    if text_encoder.get_input_embeddings().weight.shape[0] < len(tokenizer):
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are written below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id, vector in zip(ids, tokens.values()):
            weight[token_id] = vector.reshape(-1).to(weight.device, weight.dtype)
    return ids
