"""Class-specific prompts from a language model (DIAGen contribution b): requests, parsing, and the prompt CSV.

The CSV is the reference's hand-off from `generate_prompts.py` to `train_classifier.py`: `;`-delimited, header
`class_name;class_idx;prompt`, where `class_idx` is the 1-based number of the prompt within its class and the
prompt keeps the literal `{name}` placeholder that generation later fills with the class token.

Every prompt style asks for whole captions shaped `a photo of a [adjective] <class> [place] ...`, one per line:

==================  ===========================================================================================
`--content`         asks for
==================  ===========================================================================================
`setting`           the class in varied, realistic places (optionally weather, time of day)
`adjective`         visual adjectives of the class (colour, material, shape, age, condition)
`setting_adjective` both, each part optional, so captions vary in length (the paper's default)
`uncommonSetting`   places where the class is rarely seen (underwater, in snow, in a desert); the reference's
                    `--content-gpt edge_cases`
==================  ===========================================================================================
"""

from __future__ import annotations

import ast
import csv
import io
import logging
import os
import re
import string
import zlib
from pathlib import Path
from typing import Sequence

from semantic_aug.core.utils import UserError, atomic_write_text

logger = logging.getLogger(__name__)

NAME_PLACEHOLDER = "{name}"
CAPTION_OPENER = "a photo of"
CSV_DELIMITER = ";"
CSV_HEADER = ("class_name", "class_idx", "prompt")
CONTENT_STYLES = ("setting", "adjective", "setting_adjective", "uncommonSetting")
DEFAULT_CONTENT = "setting_adjective"
PROMPT_SURPLUS = 3  # ask for this many captions more than still needed: some answers fail the filter
TOKENS_PER_PROMPT = 24  # generous token budget for one numbered caption line
TOKENS_OVERHEAD = 48  # budget for a model's opening line ("Here are ...")
MAX_PROMPT_WORDS = 30  # longer lines are prose, not captions (and would overflow CLIP's 77 tokens)

SYSTEM_MESSAGE = ("You write short, concrete captions for a text-to-image model. Answer with a numbered list only, "
                  "one caption per line, and nothing else.")
ANSWER_PREFILL = "1. a photo of a"  # local models continue this, which keeps small ones in the list format
# Per style: the instruction, and examples built on the class itself (examples about another object lead small
# models to write about that object); the examples are generic enough to suit any object or animal.
STYLE_INSTRUCTIONS = {
    "setting": (
        "Write {count} different captions of a photo of a {cls}, each in a different place. Start each caption "
        "with \"a photo of a {cls}\", then say where it is; you may add the weather or the time of day. Use "
        "realistic places that look different from each other.",
        ("a photo of a {cls} outdoors in the rain", "a photo of a {cls} in a room at night")),
    "adjective": (
        "Write {count} different captions of a photo of a {cls} that differ in how the {cls} looks. Each caption is "
        "\"a photo of a\", then one or two visual adjectives (colour, material, shape, size, age, condition), then "
        "\"{cls}\". No adjectives about feelings or sounds.",
        ("a photo of a small dark {cls}", "a photo of a shiny white {cls}")),
    "setting_adjective": (
        "Write {count} different captions of a photo of a {cls}. Each caption is \"a photo of a\", then "
        "optionally an adjective that describes how the {cls} looks, then \"{cls}\", then optionally where it is, "
        "the weather and the time of day. Vary how many of these optional parts each caption uses.",
        ("a photo of a small {cls} outdoors in the rain", "a photo of a {cls} in a room at night",
         "a photo of a dark {cls} in the morning")),
    "uncommonSetting": (
        "Write {count} different captions of a photo of a {cls} in a place where a {cls} is rarely seen, such as "
        "underwater, in deep snow, in a desert, in a jungle or on a rooftop. Start each caption with \"a photo of "
        "a {cls}\", then name the unusual place.",
        ("a photo of a {cls} underwater", "a photo of a {cls} on a frozen lake")),
}

_CAPTION_OPENER = re.compile(r"^(?:a|an|the)?\s*(?:photo|picture|image|photograph|shot)\s+of\b", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:a|an|the)\s", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•·+>]+\s*|\(?\d{1,3}\s*[.):\]]\s*|\d{1,3}\s+-\s*|\(?[a-zA-Z][.)]\s+)")
_LABEL = re.compile(r"^(?:prompt|caption|description)\s*#?\d*\s*[:.\-–]\s*", re.IGNORECASE)
_BRACKETED_LIST = re.compile(r"\[[^\[\]]*\]", re.DOTALL)
_TEMPLATE_SLOT = re.compile(r"[\[\]<>]")  # an echoed "[adjective]" or "<class>" slot, not a caption
_QUOTED = re.compile(r"[\"“]([^\"“”]+)[\"”]")
_CODE_FENCE = re.compile(r"^\s*```[\w-]*\s*$", re.MULTILINE)
_FILLER_WORDS = {"a", "an", "the", "of", "photo", "picture", "image", "photograph", "shot"}
_QUOTES = "\"'“”‘’`«»"
_DOUBLE_QUOTES = "\"“”"


# ----------------------------------------------------------------------------------------------------------
# requests


def readable_class_name(class_name: str) -> str:
    """The class name as words (`cell_phone` -> `cell phone`), as the language model should read it."""
    return " ".join(class_name.replace("_", " ").split())


def build_messages(class_name: str, count: int, content: str = DEFAULT_CONTENT) -> list[dict]:
    """The chat that asks a language model for `count` captions of `class_name` in the style `content`.

    Args:
        class_name: the dataset's class name (underscores read as spaces).
        count: how many captions to ask for.
        content: one of `CONTENT_STYLES`.

    Returns:
        A system and a user message, and the start of the answer (`ANSWER_PREFILL`) for local models to continue.
    """
    if content not in STYLE_INSTRUCTIONS:
        raise UserError(f"unknown prompt style {content!r}; choose one of {', '.join(CONTENT_STYLES)}")
    cls = readable_class_name(class_name)
    instruction, examples = STYLE_INSTRUCTIONS[content]
    shown = "\n".join(f"- {text.format(cls=cls)}" for text in examples)
    user = (f"{instruction.format(count=count, cls=cls)}\n\nExamples:\n{shown}\n\nNow write {count} new "
            f"captions, numbered 1 to {count}, one per line. Every caption must contain the words \"{cls}\".")
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user},
            {"role": "assistant", "content": ANSWER_PREFILL}]


# ----------------------------------------------------------------------------------------------------------
# parsing


def _class_pattern(class_name: str) -> re.Pattern:
    """The class name as whole words, case-insensitive; words may be joined by spaces, `_` or `-`."""
    words = readable_class_name(class_name).split()
    return re.compile(r"(?<!\w)" + r"[\s_-]+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE)


def _candidates(text: str) -> list[tuple[str, bool]]:
    """Split an answer into (candidate, is_list_item) pairs: items of Python/JSON lists, then lines of the rest."""
    text = _CODE_FENCE.sub("\n", text)
    found: list[tuple[str, bool]] = []

    def take_list(match: re.Match) -> str:
        try:
            value = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return match.group(0)
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            return match.group(0)
        found.extend((item, True) for item in value)
        return "\n"

    rest = _BRACKETED_LIST.sub(take_list, text)
    for line in rest.splitlines():
        marker = _LIST_MARKER.match(line)
        line = line[marker.end():] if marker else line
        found.append((line, marker is not None))
        if marker is None:  # chatter may still quote a caption: `Here is one: "a photo of a car in snow"`
            found.extend((quoted, False) for quoted in _QUOTED.findall(line))
    return found


def _clean(candidate: str) -> str:
    """Strip labels, markdown, quotes and trailing punctuation; make the text safe for the CSV and `str.format`."""
    text = " ".join(candidate.replace("**", "").replace("{", "").replace("}", "").replace(";", ",").split())
    text = _LABEL.sub("", text)
    for _ in range(2):  # a quoted item may end in a comma: "a photo of ...",
        text = text.strip().rstrip(",").strip().strip(_QUOTES).strip()
    for quote in _DOUBLE_QUOTES:  # inner double quotes would make the CSV field a quoted one
        text = text.replace(quote, "")
    text = " ".join(text.rstrip(".!").split())
    opener = _CAPTION_OPENER.match(text)
    if opener:  # "A photo of" -> "a photo of"
        text = text[:opener.end()].lower() + text[opener.end():]
    return text


def parse_llm_prompts(text: str, class_name: str) -> list[str]:
    """The prompts in a language model's answer, with the class name replaced by `{name}`.

    Survives numbered lists, bullets, quotes, Python/JSON lists, code fences and chatter. A line counts as a
    prompt when it names the class (whole words; `_` reads as a space; any case) and starts like a caption
    ("a photo of ...", "an image of ..."), or is a list item that starts with an article ("a red car in the
    snow" becomes "a photo of a red {name} in the snow"). Dropped: lines ending in `:` or `?`, prose longer
    than `MAX_PROMPT_WORDS`, echoed template slots (`[adjective]`, `<class>`), prompts that add nothing to the
    bare class name, and duplicates (ignoring case).

    Args:
        text: the raw answer.
        class_name: the dataset class the answer is about.

    Returns:
        The distinct prompts in answer order, each containing `{name}`.
    """
    pattern = _class_pattern(class_name)
    prompts = []
    for candidate, is_list_item in _candidates(text):
        prompt = _clean(candidate)
        if (not prompt or prompt.endswith((":", "?")) or len(prompt.split()) > MAX_PROMPT_WORDS
                or _TEMPLATE_SLOT.search(prompt)):
            continue
        if not _CAPTION_OPENER.match(prompt):
            if not (is_list_item and _ARTICLE.match(prompt)):  # instructions and chatter start otherwise
                continue
            prompt = f"{CAPTION_OPENER} {prompt[0].lower()}{prompt[1:]}"  # "A red car" -> "a photo of a red car"
        if not pattern.search(prompt):
            continue
        prompt = pattern.sub(NAME_PLACEHOLDER, prompt)
        content_words = [w for w in re.findall(r"[\w{}]+", prompt.lower()) if w not in _FILLER_WORDS]
        if content_words != [NAME_PLACEHOLDER] * len(content_words):
            prompts.append(prompt)
    return merge_prompts([], prompts)


def _dedupe_key(prompt: str) -> str:
    return " ".join(prompt.casefold().split())


def merge_prompts(prompts: Sequence[str], new: Sequence[str]) -> list[str]:
    """`prompts` followed by those of `new` not already present (ignoring case and spacing).

    Args:
        prompts: the prompts so far (kept as they are).
        new: more prompts, possibly repeating some.

    Returns:
        The distinct prompts, in order.
    """
    seen = {_dedupe_key(p) for p in prompts}
    merged = list(prompts)
    for prompt in new:
        if _dedupe_key(prompt) not in seen:
            seen.add(_dedupe_key(prompt))
            merged.append(prompt)
    return merged


def request_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed for one request, stable across runs and Python processes (unlike `hash`).

    Deriving it from (seed, class name, try) means a class gets the same prompts whether or not a resumed run
    did the classes before it.
    """
    return zlib.crc32("\x1f".join(map(str, (seed, *parts))).encode("utf-8")) & 0x7FFFFFFF


def generate_class_prompts(llm, class_name: str, num_prompts: int, content: str = DEFAULT_CONTENT, seed: int = 0,
                           max_tries: int = 5) -> list[str]:
    """Ask `llm` for `num_prompts` distinct prompts of one class, asking again (at most `max_tries` requests).

    Each request has its own seed derived from (`seed`, class, try), so a class gets the same prompts whether
    it is generated alone or after other classes.

    Args:
        llm: a `semantic_aug.stages.llm.ChatModel`.
        class_name: the dataset class.
        num_prompts: how many prompts the class needs.
        content: the prompt style, one of `CONTENT_STYLES`.
        seed: the run's seed.
        max_tries: how many requests to spend on this class at most.

    Returns:
        Exactly `num_prompts` prompts, or fewer if the tries ran out.
    """
    prompts: list[str] = []
    for attempt in range(max_tries):
        count = num_prompts - len(prompts) + PROMPT_SURPLUS
        have = list(prompts)

        def enough(answer: str) -> bool:  # stop a local model once its finished lines give the prompts needed
            finished = answer[: answer.rfind("\n") + 1]
            return len(merge_prompts(have, parse_llm_prompts(finished, class_name))) >= num_prompts

        answer = llm.chat(build_messages(class_name, count, content), seed=request_seed(seed, class_name, attempt),
                          max_new_tokens=TOKENS_OVERHEAD + TOKENS_PER_PROMPT * count, stop_when=enough)
        prompts = merge_prompts(prompts, parse_llm_prompts(answer, class_name))
        if len(prompts) >= num_prompts:
            return prompts[:num_prompts]
        logger.info("class %s: %d of %d prompts after try %d", class_name, len(prompts), num_prompts, attempt + 1)
    return prompts


# ----------------------------------------------------------------------------------------------------------
# the prompt CSV


def _check_prompt(prompt: str, where: str) -> None:
    if not prompt.strip():
        raise UserError(f"empty prompt {where}; every row needs a prompt")
    if CSV_DELIMITER in prompt or "\n" in prompt or "\r" in prompt:
        raise UserError(f"prompt {where} contains ';' or a line break, which the ';'-delimited CSV cannot hold")
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(prompt) if field is not None}
    except ValueError:
        fields = None
    if fields != {"name"}:
        raise UserError(f"prompt {where} must contain the placeholder {NAME_PLACEHOLDER} and no other braces: "
                        f"{prompt!r}")


def write_prompt_csv(prompts: dict[str, list[str]], path: str | os.PathLike) -> None:
    """Write prompts as the reference's `;`-delimited CSV (`class_name;class_idx;prompt`), atomically.

    Args:
        prompts: class name -> prompts (each containing `{name}`), written in dict order.
        path: the CSV file; its folder is created if needed.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=CSV_DELIMITER, lineterminator="\n")  # quotes only a field with '"'
    writer.writerow(CSV_HEADER)
    for class_name, class_prompts in prompts.items():
        for class_idx, prompt in enumerate(class_prompts, start=1):
            _check_prompt(prompt, f"{class_idx} of class {class_name!r}")
            writer.writerow((class_name, class_idx, prompt))
    atomic_write_text(path, buffer.getvalue())


def _class_key(class_name: str) -> str:
    return readable_class_name(class_name).casefold()


def read_prompt_csv(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Read a prompt CSV written by `generate_prompts.py` (or the reference).

    Args:
        path: the `;`-delimited CSV with header `class_name;class_idx;prompt` (a leading pandas index column is
            tolerated).
        class_names: when given, every one of these classes must have a prompt; they are matched ignoring case
            and `_` versus space, and the result holds exactly these classes, in this order and spelling.

    Returns:
        class name -> prompts in file order, each with the literal `{name}` placeholder.

    Raises:
        UserError: missing file, wrong delimiter or header, a malformed row or empty prompt (with its line
            number), or a class of `class_names` without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt CSV not found: {path}; make one with generate_prompts.py or pass the right path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"prompt CSV {path} is not UTF-8 text") from None
    rows = list(csv.reader(io.StringIO(text), delimiter=CSV_DELIMITER))
    header = [cell.strip() for cell in rows[0]] if rows else []
    skip = 1 if header[:1] in ([""], ["Unnamed: 0"]) else 0  # pandas' index column
    if header[skip:] != list(CSV_HEADER):
        found = ",".join(header) if header else "an empty file"
        hint = " (it looks ','-delimited; prompt CSVs use ';')" if len(header) == 1 and "," in header[0] else ""
        raise UserError(f"prompt CSV {path} must start with the header {CSV_DELIMITER.join(CSV_HEADER)!r}, "
                        f"found {found!r}{hint}")
    prompts: dict[str, list[str]] = {}
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(CSV_HEADER) + skip:
            raise UserError(f"prompt CSV {path}, line {line_number}: expected {len(CSV_HEADER)} ';'-separated "
                            f"fields, found {len(row) - skip}")
        class_name, _, prompt = (cell.strip() for cell in row[skip:])
        _check_prompt(prompt, f"on line {line_number} of {path}")
        prompts.setdefault(class_name, []).append(prompt)
    if class_names is None:
        return prompts
    by_key = {_class_key(name): values for name, values in prompts.items()}
    missing = [name for name in class_names if _class_key(name) not in by_key]
    if missing:
        raise UserError(f"prompt CSV {path} has no prompts for class(es) {', '.join(missing)}; "
                        f"generate them with generate_prompts.py")
    return {name: list(by_key[_class_key(name)]) for name in class_names}
