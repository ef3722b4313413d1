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
    evaluation = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert [e["name"] for e in evaluation][0] == "teacher" and len(evaluation) == 5
    assert all(0.0 <= e["value"] <= 1.0 for e in evaluation)
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "student-distilled" in html
