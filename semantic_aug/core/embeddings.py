"""Learned Textual Inversion tokens: names, files, loading into a text encoder, and `embedding_noise` (DIAGen a).

One token per class, `<class_name>` with spaces turned into `_` (`<cell_phone>`). A token may hold several vectors
(`fine_tune.py --num_vectors N`, as the DA-Fusion paper learned 4): its value is then [N, dim], and in a tokenizer it
is the N tokens `<class_name>`, `<class_name>_1`, ..., `<class_name>_{N-1}`, which a prompt's `<class_name>` expands
to (diffusers' `load_textual_inversion` and `maybe_convert_prompt` use the same names). DIAGen's contribution (a)
adds noisy copies `<class_name_σ>` = e + σ·N(0, I) for each standard deviation σ (absolute, not relative to
the embedding's norm), so that generation can pick between slightly different versions of a class concept.

File formats (compatible with the reference; where they live: `semantic_aug.core.layout.RunLayout`):
    per class:  `{fine_tuned_dir}/{class_}/learned_embeds.bin`, torch.save({"<class_>": [dim]})
                ([N, dim] for N > 1 vectors)
                (+ `learned_embeds.safetensors`, the same dict, which diffusers' `load_textual_inversion` reads)
    merged:     `RunLayout.tokens()`, {"<class_>": [dim] or [N, dim], ...}
    with noise: `RunLayout.tokens(noise=True)`, originals and `<class_σ>` per σ

SDXL has two text encoders, and a token has a vector in each. The first encoder's vectors are the files above,
unchanged; the second encoder's sit beside them with `_2` before the suffix, in the same format and with the same
token names: `learned_embeds_2.safetensors` per class (the name diffusers' SDXL Textual Inversion example writes)
and `{dataset}-{seed}-{epc}_2.pt` per run (`second_encoder_path`), its noisy copies drawn from their own seed.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from semantic_aug.core.utils import UserError, atomic_torch_save, atomic_write_bytes

LEARNED_EMBEDS_NAME = "learned_embeds.bin"  # the reference's per-class file (torch.save of {token: tensor})
LEARNED_EMBEDS_SAFE_NAME = "learned_embeds.safetensors"  # the name diffusers' load_textual_inversion looks for
LEARNED_EMBEDS_2_SAFE_NAME = "learned_embeds_2.safetensors"  # SDXL's second encoder (diffusers' SDXL TI example)
TOKEN_OPEN, TOKEN_CLOSE = "<", ">"


def class_folder_name(class_name: str) -> str:
    """The per-class folder and token stem: spaces become `_` (`cell phone` -> `cell_phone`)."""
    return class_name.replace(" ", "_")


def token_name(class_name: str) -> str:
    """The learned token of a class: `cell phone` -> `<cell_phone>`."""
    return f"{TOKEN_OPEN}{class_folder_name(class_name)}{TOKEN_CLOSE}"


def vector_token_names(token: str, num_vectors: int) -> list[str]:
    """The tokenizer tokens of a token with `num_vectors` vectors: `<car>`, `<car>_1`, ..., `<car>_{N-1}` (the names
    diffusers' `load_textual_inversion` gives the rows of an [N, dim] embedding)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def num_vectors_of(vector: torch.Tensor) -> int:
    """How many vectors a token's value holds: 1 for [dim], N for [N, dim]."""
    return 1 if vector.dim() == 1 else vector.shape[0]


def expand_vector_tokens(prompt: str, tokenizer) -> str:
    """Write every multi-vector token of `prompt` as all its vector tokens: `a photo of a <car>` becomes
    `a photo of a <car> <car>_1 <car>_2` when `<car>` was added with 3 vectors. Single-vector tokens and words stay.

    This is what diffusers' `TextualInversionLoaderMixin.maybe_convert_prompt` does before its pipelines encode a
    prompt; prompt states built by hand from the tokenizer need it too, or they would use only the first vector.
    Unlike diffusers' plain substring replacement, `<car>` is not matched inside `<car>_1`.
    """
    added = tokenizer.added_tokens_encoder
    for token in dict.fromkeys(tokenizer.tokenize(prompt)):
        if token not in added or f"{token}_1" not in added:
            continue
        count = 1
        while f"{token}_{count}" in added:
            count += 1
        replacement = " ".join(vector_token_names(token, count))
        prompt = re.sub(re.escape(token) + r"(?!_\d)", lambda match: replacement, prompt)
    return prompt


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
        embeddings: token (`<name>`) -> embedding [dim], or [N, dim] for a multi-vector token (every vector gets
            its own noise).
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


def embedding_rms(embeddings: Mapping[str, torch.Tensor]) -> float:
    """Root mean square of all coordinates of `embeddings`: the scale an absolute σ of `embedding_noise` meets.

    Learned tokens start from a word of the model's vocabulary and stay near its scale, so this tells how large a
    given σ is for the model at hand (σ / RMS is the relative noise).
    """
    values = torch.cat([vector.float().reshape(-1) for vector in embeddings.values()])
    return float(values.square().mean().sqrt())


def second_encoder_path(path: str | os.PathLike) -> Path:
    """SDXL: the second text encoder's token file beside the first encoder's `path`: `{stem}_2{suffix}`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_2{path.suffix}")


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
    """Read a token file (a dict token -> tensor [dim] or [N, dim]; `[1, dim]` is flattened) and check it.

    Args:
        path: a `.pt`/`.bin` (torch.save) or `.safetensors` file.
        class_names: if given, every class must have its token `<class_>` (exact name match).
        embedding_dim: if given, every vector must have this width (the text encoder's hidden size).

    Returns:
        token -> float tensor [dim] (one vector) or [N, dim] (N > 1 vectors), in file order.

    Raises:
        UserError: missing file, not a torch/safetensors dict, non-tensor values or values of another shape, a class
            without its token, or the wrong width.
    """
    path = Path(path)
    data = _read_token_dict(path)
    tokens: dict[str, torch.Tensor] = {}
    for token, value in data.items():
        if not isinstance(token, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"malformed token file {path}: entry {token!r} is not a string -> tensor pair")
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() not in (1, 2) or value.numel() == 0:
            raise UserError(f"malformed token file {path}: token {token} has shape {tuple(value.shape)}, "
                            f"expected [dim] or [num_vectors, dim]")
        if embedding_dim is not None and value.shape[-1] != embedding_dim:
            raise UserError(f"token {token} in {path} is {value.shape[-1]} wide, but the text encoder expects "
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


def collect_class_tokens(run_dir: str | os.PathLike, class_names: Sequence[str],
                         file_name: str = LEARNED_EMBEDS_NAME) -> dict[str, torch.Tensor]:
    """Read every class's `{run_dir}/{class_}/learned_embeds.bin` into one dict `<class_>` -> [dim] or [N, dim], in
    class order
    (`file_name`: another per-class file, such as SDXL's `learned_embeds_2.safetensors`).

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
        path = folder / file_name
        if not path.is_file():
            raise UserError(f"class {class_name!r} is unfinished: {path} is missing; rerun fine_tune.py to finish it")
        expected = token_name(class_name)
        found = load_tokens(path)
        if list(found) != [expected]:
            raise UserError(f"{path} holds token(s) {', '.join(found)}, expected exactly {expected}")
        tokens[expected] = found[expected]
    widths = {vector.shape[-1] for vector in tokens.values()}
    if len(widths) > 1:
        raise UserError(f"the class tokens in {run_dir} have different widths {sorted(widths)}; they come from "
                        f"different models")
    return tokens


def add_tokens_to_text_encoder(tokenizer, text_encoder, tokens: Mapping[str, torch.Tensor]) -> list[int]:
    """Add `tokens` to the tokenizer and write their vectors into the text encoder's input embedding.

    A token with an [N, dim] value becomes the N tokens `vector_token_names(token, N)`, one embedding row each, as
    diffusers' `load_textual_inversion` adds it; `expand_vector_tokens` then writes a prompt's `token` as all N.
    A token that an earlier call already added is reused (its vectors overwritten); a token that is a word of
    the base vocabulary is refused, since overwriting it would change every prompt that uses the word. The
    function takes a tokenizer and its text encoder rather than a pipeline, so that a model with two text encoders
    can call it once per encoder.

    Args:
        tokenizer: a CLIP tokenizer.
        text_encoder: its CLIP text model.
        tokens: token -> vector [dim] or vectors [N, dim].

    Returns:
        The ids of the tokenizer tokens, in the order of `tokens` and, within a token, of its vectors.

    Raises:
        UserError: a token that is part of the base vocabulary, one that does not tokenize to exactly one id,
            a vector of the wrong width, or a token added before with another number of vectors.
    """
    width = text_encoder.get_input_embeddings().weight.shape[1]
    rows: dict[str, torch.Tensor] = {}  # tokenizer token -> its vector
    for token, vector in tokens.items():
        if vector.dim() not in (1, 2) or vector.shape[-1] != width or vector.numel() == 0:
            raise UserError(f"token {token} has shape {tuple(vector.shape)}, but the text encoder expects [{width}] "
                            f"or [num_vectors, {width}]; the tokens were learned with another model")
        names = vector_token_names(token, num_vectors_of(vector))
        if f"{token}_{len(names)}" in tokenizer.added_tokens_encoder:  # a stale extra vector would join its prompts
            raise UserError(f"token {token} was added to this model with more vectors than its {len(names)}; "
                            f"load the token file into a freshly loaded model")
        for name, row in zip(names, vector.reshape(-1, width)):
            if name in tokenizer.get_vocab() and name not in tokenizer.added_tokens_encoder:
                raise UserError(f"token {name} is already a word of the tokenizer's vocabulary; choose another name")
            rows[name] = row
    tokenizer.add_tokens(list(rows))
    ids = tokenizer.convert_tokens_to_ids(list(rows))
    for token, token_id in zip(rows, ids):
        encoded = tokenizer(token, add_special_tokens=False).input_ids
        if encoded != [token_id]:
            raise UserError(f"token {token} does not tokenize to one id (got {encoded}); use a name without spaces")
    if text_encoder.get_input_embeddings().weight.shape[0] < len(tokenizer):
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are written below
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id, vector in zip(ids, rows.values()):
            weight[token_id] = vector.to(weight.device, weight.dtype)
    return ids


def collect_second_encoder_tokens(run_dir: str | os.PathLike,
                                  class_names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """SDXL: every class's second-encoder vector (`learned_embeds_2.safetensors`), or None where the run's first
    class has none (a one-encoder model)."""
    run_dir = Path(run_dir)
    if not class_names or not (run_dir / class_folder_name(class_names[0]) / LEARNED_EMBEDS_2_SAFE_NAME).is_file():
        return None
    return collect_class_tokens(run_dir, class_names, file_name=LEARNED_EMBEDS_2_SAFE_NAME)


def load_tokens_into_pipeline(path: str | os.PathLike, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None,
                              class_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a token file and add its tokens to the text encoder; for SDXL (`text_encoder_2` given) also the
    second encoder's file (`second_encoder_path`), which must hold the same tokens.

    Returns:
        The first encoder's tokens, as `load_tokens` returns them.

    Raises:
        UserError: as `load_tokens`, a missing second file, or token names that differ between the two files.
    """
    tokens = load_tokens(path, class_names, embedding_dim=text_encoder.get_input_embeddings().weight.shape[1])
    if text_encoder_2 is not None:
        path_2 = second_encoder_path(path)
        if not path_2.is_file():
            raise UserError(f"this SDXL model has two text encoders, but {path_2} (the second encoder's tokens beside "
                            f"{path}) is missing; learn the tokens with this model and rerun aggregate_embeddings.py")
        tokens_2 = load_tokens(path_2, class_names, embedding_dim=text_encoder_2.get_input_embeddings().weight.shape[1])
        if list(tokens_2) != list(tokens):
            raise UserError(f"{path_2} and {path} hold different tokens; rerun aggregate_embeddings.py")
        add_tokens_to_text_encoder(tokenizer_2, text_encoder_2, tokens_2)
    add_tokens_to_text_encoder(tokenizer, text_encoder, tokens)
    return tokens
