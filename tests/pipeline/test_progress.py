"""Progress lines and the loss text the training loop puts on them."""

import io

from distill.pipeline.progress import Progress, loss_text


def test_loss_text_names_the_parts_that_differ_from_the_loss():
    assert loss_text({"loss": 0.5, "soft": 0.25, "ce": 1.0, "lr": 1e-3}) == "loss 0.5000 (soft 0.2500, ce 1.0000)"
    assert loss_text({"loss": 0.7, "ce": 0.7}) == "loss 0.7000"  # train-teacher: the loss is the CE
    assert loss_text({"loss": 0.2, "soft": 0.1, "ce": None}) == "loss 0.2000 (soft 0.1000)"  # alpha 0, T^2 scaling
    assert loss_text({"step": 3}) == "" and loss_text({}) == ""


def test_a_progress_line_carries_the_note():
    stream = io.StringIO()
    bar = Progress(4, unit="steps", rate_unit="examples", stream=stream)
    bar.update(2, 64)
    bar.note = "loss 0.5000"
    bar.close()
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("2/4 steps (50%)") and line.endswith(", loss 0.5000")
    assert "loss" not in Progress(4, stream=io.StringIO()).line()
