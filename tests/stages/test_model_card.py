"""The model card written beside every trained model: read back by huggingface_hub, results updated, carried over.

These are unit tests of distill.pipeline.modelcard on a store spec built in memory; the
cards that train-student, evaluate and quantize write on real runs are checked in
test_evaluate_quantize.py, test_train.py and test_demo.py, on the runs those already make.
"""

import warnings

from huggingface_hub import ModelCard

from distill.pipeline.modelcard import (RESULTS_END, RESULTS_START, card_path, quantized_card, record_results,
                                        split_card, training_card, update_results)
from distill.storage.manifest import StoreSpec

PROVENANCE = {  # the shape generate-labels records in the manifest's extra (every key optional)
    "teacher": {"spec": "/models/teacher", "name_or_path": "meta-llama/Llama-3.2-1B", "architecture": "LlamaForCausalLM",
                "revision": "4e20de3", "parameters": 1_235_814_400, "license": "llama3.2",
                "license_source": "README.md", "weights_fingerprint": "w123", "run_dir": None},
    "dataset": {"spec": "HuggingFaceFW/fineweb-edu", "split": "train", "examples": 100, "fingerprint": "d456",
                "license": "odc-by"},
    "command": "distill generate-labels --teacher /models/teacher --accept-teacher-license llama3.2",
    "config": {"k": 8}, "tool_version": "0.9.0", "created": "2026-11-30T11:00:00Z",
    "license_acknowledged": "llama3.2",
}
HOW = {"student": "gpt:d_model=32", "data": "HuggingFaceFW/fineweb-edu", "loss": "kl", "temperature": 1.0,
       "alpha": 0.0, "steps": 30}


def spec(provenance=None) -> StoreSpec:
    extra = {"task": "causal-lm", **({"provenance": provenance} if provenance is not None else {})}
    return StoreSpec(method="topk", k=8, vocab_size=300, num_examples=100, temperatures=(1.0, 2.0),
                     teacher_fingerprint="t789", dataset_fingerprint="d456", extra=extra)


def load_quietly(path) -> ModelCard:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning huggingface_hub raises while parsing fails the test
        return ModelCard.load(path)


def test_a_student_card_reads_back_with_the_teachers_license_and_provenance(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(training_card(HOW, "causal-lm", "transformers", spec(PROVENANCE)))
    card = load_quietly(path)
    meta = card.data.to_dict()
    assert meta == {"license": "llama3.2", "base_model": "meta-llama/Llama-3.2-1B",
                    "datasets": ["HuggingFaceFW/fineweb-edu"], "tags": ["distillation", "text-generation"],
                    "library_name": "transformers"}
    for fact in ("method topk, k 8, temperatures 1, 2", "- loss: `kl`", "- temperature: 1", "- alpha: 0",
                 "- steps: 30", "revision: `4e20de3`", "parameters: 1,235,814,400", "license_source: `README.md`",
                 "--accept-teacher-license llama3.2", "fingerprint: `d456`", "license: `odc-by`", "not legal advice"):
        assert fact in card.text, fact
    # a licence given to train-student wins; a local teacher path and a built-in dataset are no Hub ids
    local = {**PROVENANCE, "teacher": {"spec": str(tmp_path), "name_or_path": str(tmp_path), "license": None},
             "dataset": {"spec": "mnist1d:num_samples=600"}}
    meta, _ = split_card(training_card(HOW, "classification", "pytorch", spec(local), license="apache-2.0"))
    assert meta == {"license": "apache-2.0", "tags": ["distillation", "classification"], "library_name": "pytorch"}


def test_a_store_without_provenance_gives_a_card_of_what_the_manifest_knows(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(training_card(HOW, "causal-lm", "pytorch", spec()))
    card = load_quietly(path)
    assert card.data.license == "unknown" and card.data.base_model is None
    assert "fingerprint: `t789`" in card.text and "100 examples, fingerprint `d456`" in card.text
    teacher_card = training_card({"model": "mlp", "steps": 5}, "classification", "pytorch")  # train-teacher's
    assert split_card(teacher_card)[0]["tags"] == ["classification"] and "## Teacher" not in teacher_card


def test_evaluate_results_replace_the_section_each_time_and_only_in_distills_cards(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "README.md").write_text(training_card(HOW, "causal-lm", "pytorch", spec(PROVENANCE)))
    assert record_results(str(run), "first table") == str(run / "model" / "README.md")
    assert record_results(str(run), "student keeps 97.0% of the teacher's accuracy") is not None
    text = (run / "model" / "README.md").read_text()
    assert text.count(RESULTS_START) == text.count(RESULTS_END) == 1 and "first table" not in text
    assert "student keeps 97.0%" in text and load_quietly(run / "model" / "README.md").data.license == "llama3.2"
    foreign = tmp_path / "hub-model"
    foreign.mkdir()
    (foreign / "README.md").write_text("---\nlicense: mit\n---\n# someone else's card\n")
    assert card_path(str(foreign)) is None and record_results(str(foreign), "x") is None
    assert "x" not in (foreign / "README.md").read_text().split("card")[-1]
    assert update_results("# no section\n", "y").endswith(f"{RESULTS_START}\ny\n{RESULTS_END}\n")


def test_a_quantized_card_carries_the_source_and_says_how_it_was_quantized(tmp_path):
    source = update_results(training_card(HOW, "causal-lm", "transformers", spec(PROVENANCE)), "the float results")
    summary = {"method": "dynamic-int8", "source": "runs/student", "export": "script", "traced_on": None,
               "quantized_linears": 4, "bytes_before": 4000, "bytes_after": 1500}
    path = tmp_path / "README.md"
    path.write_text(quantized_card(source, summary))
    card = load_quietly(path)
    assert card.data.license == "llama3.2" and card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.library_name == "pytorch" and card.data.tags == ["distillation", "text-generation", "quantized",
                                                                      "int8"]
    assert "## Quantization" in card.text and "--method dynamic-int8" in card.text and "4 Linear layers" in card.text
    assert "4,000 bytes before, 1,500 after" in card.text and "the float results" not in card.text
    assert "revision: `4e20de3`" in card.text  # the provenance travels with it
    bare = quantized_card(None, summary)  # a source without a distill card
    assert split_card(bare)[0]["license"] == "unknown" and "## Quantization" in bare and RESULTS_START in bare
