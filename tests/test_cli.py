"""Every script's command line: each flag's default shows in --help, and every command of the README (and of
the reference's README and docstrings) parses through the script's real parser, unknown flags failing."""

import argparse
import contextlib
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SCRIPTS = ("fine_tune", "aggregate_embeddings", "generate_prompts", "train_classifier", "train_filter",
           "eval_on_testset", "report", "test_image_generation", "semantic_aug.runner")
# commands of the reference DIAGen repository: its README's classifier command and aggregate_embeddings.py's
# documented noise command
REFERENCE_COMMANDS = [
    'python train_classifier.py --dataset "focus" --examples-per-class 4 --strength 0.7 --guidance-scale 15 '
    '--synthetic-probability 0.7 --use-embedding-noise 1 --use-generated-prompts 1 '
    '--prompt-path "prompts/focus/prompts_gpt4.csv" --synthetic_filter "train" --method "noise_llm_filter" '
    '--eval_on_test_set "test" --num-synthetic 10 --num-epochs 50 --iterations-per-epoch 200 --device 0',
    'python aggregate_embeddings.py --seeds 0 --examples-per-class 8 --dataset "coco" --augment-embeddings True '
    '--input-path "./fine-tuned" --embed-path "tokens/{dataset}-tokens/noise/{dataset}-{seed}-{examples_per_class}.pt"',
]


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def real_parser(script: str) -> argparse.ArgumentParser:
    """The parser a script builds: its `parse_args()` runs up to the point where argparse would read the flags."""
    import importlib
    import importlib.util

    if "." in script:
        module = importlib.import_module(script)
    else:
        spec = importlib.util.spec_from_file_location(f"cli_{script}", REPO_ROOT / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)

    def capture(self, *args, **kwargs):
        raise Captured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.suppress(TypeError):
            module.parse_args([])
        module.parse_args()
    except Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{script}.parse_args never built a parser")


@pytest.fixture(scope="module")
def parsers():
    return {script: real_parser(script) for script in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_shows_its_default_in_help(parsers, script):
    parser = parsers[script]
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        text = formatter.format_help()
        if not action.help or "default" not in text.lower():
            missing.append(action.option_strings[0])
    assert not missing, f"{script}: no default shown for {', '.join(missing)}"
    assert "SPEC" not in parser.format_help()  # the help speaks for itself


def readme_commands() -> list[str]:
    """Each `python ...` command in the README's code blocks, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / "README.md").read_text()
    commands = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if language not in ("", "bash", "sh"):
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words[:1] == ["accelerate"]:
                words = ["python", *[w for w in words if w.endswith(".py")][:1],
                         *words[[i for i, w in enumerate(words) if w.endswith(".py")][0] + 1:]]
            if words[:1] == ["python"]:
                commands.append(shlex.join(words))
    return commands


def script_of(words: list[str]) -> tuple[str, list[str]]:
    if words[1] == "-m":
        return words[2], words[3:]
    return Path(words[1]).stem, words[2:]


def test_the_readme_has_the_pipeline_commands():
    scripts = {script_of(shlex.split(command))[0] for command in readme_commands()}
    assert {"fine_tune", "aggregate_embeddings", "generate_prompts", "train_filter", "train_classifier",
            "semantic_aug.runner", "report"} <= scripts


def readme_plugin_module(path: str) -> str:
    """The README's Python block that starts with `# {path}` (the dataset plugin example)."""
    text = (REPO_ROOT / "README.md").read_text()
    blocks = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if block.startswith(f"# {path}\n")]
    assert blocks, f"the README names {path} but shows no Python block for it"
    return blocks[0]


@pytest.mark.parametrize("command", readme_commands() + REFERENCE_COMMANDS)
def test_documented_commands_parse(parsers, command, tmp_path, monkeypatch):
    script, argv = script_of(shlex.split(command))
    argv = [word for word in argv if word != "..."]  # "more flags" in the README's prose commands
    if script not in parsers:
        pytest.skip(f"{script} is not a pipeline script")
    parser = parsers[script]
    if "--dataset-module" in argv:  # the README's own plugin example, written where the command expects it
        from semantic_aug.datasets.registry import load_dataset_plugins

        module = argv[argv.index("--dataset-module") + 1]
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text(readme_plugin_module(module))
        monkeypatch.chdir(tmp_path)
        load_dataset_plugins(argv)
        parser = real_parser(script)
    parser.parse_args(argv)  # argparse exits on an unknown flag or a bad value


def test_an_unknown_flag_fails_the_parse(parsers, capsys):
    with pytest.raises(SystemExit):
        parsers["train_classifier"].parse_args(["--bogus-flag", "1"])
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
