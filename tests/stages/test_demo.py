"""`distill demo --quick`: the whole recipe end to end, small."""

import json

from click.testing import CliRunner

from distill.cli import cli


def test_quick_demo_prints_the_table_and_writes_the_report(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--quick", "--device", "cpu", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output + result.stderr
    out = result.output
    for name in ("teacher", "student-scratch", "student-pseudo", "student-distilled", "student-distilled-int8"):
        assert f"\n{name} " in out
    assert "student keeps" in out and "% of the teacher's accuracy" in out
    retention = next(line for line in out.splitlines() if line.startswith("student keeps"))
    card = (tmp_path / "demo" / "student-distilled" / "model" / "README.md").read_text()
    assert retention in card and "tags:\n- distillation" in card  # the distilled student's model card
    assert "int8 student keeps" not in card and "student keeps" in (
        tmp_path / "demo" / "student-distilled-int8" / "model" / "README.md").read_text()
    evaluation = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert [e["name"] for e in evaluation][0] == "teacher" and len(evaluation) == 5
    assert all(0.0 <= e["value"] <= 1.0 for e in evaluation)
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "student-distilled" in html
