"""tools/op_trace.py: the operations a run launches, and where two runs' operations differ."""

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "op_trace.py"
SAME = "import torch\nx = torch.ones(3, 4)\nprint((x @ x.T + 1).sum().item())\n"
MORE = "import torch\nx = torch.ones(3, 4)\nprint((x @ x.T * 2 + 1).sum().item())\n"


def run_tool(cwd: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *arguments], cwd=cwd, capture_output=True, text=True)


def test_same_work_compares_equal_and_added_work_is_listed(tmp_path):
    (tmp_path / "work_a.py").write_text(SAME)
    (tmp_path / "work_b.py").write_text(SAME)
    (tmp_path / "work_c.py").write_text(MORE)
    for name in ("a", "b", "c"):
        result = run_tool(tmp_path, "record", f"{name}.txt", f"work_{name}")
        assert result.returncode == 0, result.stderr
    trace = (tmp_path / "a.txt").read_text().splitlines()
    assert any(line.startswith("aten.mm.default [(3, 4):float32,(4, 3):float32]") for line in trace), trace

    same = run_tool(tmp_path, "compare", "a.txt", "b.txt")
    assert same.returncode == 0 and "the same operations" in same.stdout

    differs = run_tool(tmp_path, "compare", "a.txt", "c.txt")
    assert differs.returncode == 1
    assert "0 operations only before, 1 only after" in differs.stdout
    assert "+aten.mul.Tensor [(3, 3):float32,]" in differs.stdout


def test_a_missing_trace_is_one_line_error(tmp_path):
    result = run_tool(tmp_path, "compare", "nothing.txt", "nothing.txt")
    assert result.returncode == 2
    assert "trace nothing.txt not found" in result.stderr.strip().splitlines()[-1]
