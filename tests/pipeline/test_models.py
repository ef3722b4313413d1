"""Model specs: every kind loads and gives logits of the right shape; weights never run pickled
code; fingerprints follow the weights, not the path; every bad spec is one ConfigError."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from modelhelp import (make_hf_causal_lm, make_hf_classifier, make_hf_remote_code_dir, make_malicious_pickle,
                       make_torchscript, tiny_feature_net, token_batch)

from distill.errors import ConfigError
from distill.pipeline.hf import quiet_hf
from distill.pipeline.modelfiles import save_weights
from distill.pipeline.models import BUILTINS, LoadedModel, ModelConfig, build_builtin, load_model, model_fingerprint


def features(n=3, width=40):
    return {"inputs": torch.randn(n, width), "labels": torch.zeros(n, dtype=torch.int64)}


@pytest.fixture(scope="module")
def hf_causal(tmp_path_factory):
    return make_hf_causal_lm(tmp_path_factory.mktemp("hf") / "causal", vocab=300)


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    return make_hf_classifier(tmp_path_factory.mktemp("hf") / "classifier", num_labels=3, pad_token_id=299)


# --- built-ins -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, batch, shape", [
    ("mlp", features(), (3, 10)),
    ("cnn:num_classes=4", features(), (3, 4)),
    ("mlp:in_features=7,depth=0", features(width=7), (3, 10)),
    ("gpt:vocab_size=64,d_model=32,n_heads=2", token_batch(64, [5, 3]), (2, 5, 64)),
])
def test_builtins_give_logits_of_the_right_shape_in_eval_mode(spec, batch, shape):
    model = load_model(ModelConfig(spec))
    assert model.task == ("causal-lm" if spec.startswith("gpt") else "classification")
    assert model.output_size == shape[-1] and not model.module.training
    assert model.logits(batch).shape == shape and model.describe["kind"] == "builtin"


def test_builtins_are_reproducible_from_their_options_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = load_model(ModelConfig("mlp:hidden=32"))
    assert torch.rand(1) == before
    again = load_model(ModelConfig("mlp:hidden=32,seed=0"))
    other_seed = load_model(ModelConfig("mlp:hidden=32,seed=1"))
    assert first.fingerprint == again.fingerprint != other_seed.fingerprint
    rebuilt = build_builtin(first.describe["name"], **first.describe["options"])
    assert model_fingerprint(rebuilt, first.describe) == first.fingerprint
    assert sorted(BUILTINS) == ["cnn", "gpt", "mlp"]


def test_a_changed_weight_or_option_changes_the_fingerprint():
    model = load_model(ModelConfig("cnn:channels=4"))
    with torch.no_grad():
        model.module.head.bias[0] += 1e-3
    assert model_fingerprint(model.module, model.describe) != model.fingerprint
    assert load_model(ModelConfig("cnn:channels=4", task="classification")).fingerprint == model.fingerprint
    assert load_model(ModelConfig("cnn:channels=5")).fingerprint != model.fingerprint


def test_tied_gpt_weights_round_trip_through_safetensors(tmp_path):
    spec = "gpt:vocab_size=40,d_model=16,n_heads=2,n_layers=1,max_len=8"
    teacher = load_model(ModelConfig(spec))
    assert teacher.module.lm_head.weight is teacher.module.tok_emb.weight
    save_weights(teacher.module, tmp_path / "gpt.safetensors")
    loaded = load_model(ModelConfig(spec + ",seed=7", weights=str(tmp_path / "gpt.safetensors")))
    assert loaded.fingerprint == teacher.fingerprint  # the seed only picked weights; the weights are the same
    batch = token_batch(40, [6, 2])
    torch.testing.assert_close(loaded.logits(batch), teacher.logits(batch), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="longer than max_len=8"):
        teacher.logits(token_batch(40, [9]))


def test_saved_builtins_load_without_random_init_and_init_is_left_as_it_was(tmp_path):
    """With weights to load, a built-in is built uninitialised (no random draws): every weight comes from the file,
    ties stay ties and torch.nn.init is restored; meanwhile a build in another thread is initialised as usual."""
    import threading
    from unittest import mock

    import distill.pipeline.models as models
    from distill.pipeline.architectures import uninitialised

    spec = "gpt:vocab_size=40,d_model=16,n_heads=2,n_layers=2,max_len=8"
    trained = load_model(ModelConfig(spec)).module
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.rand_like(p))  # weights no seed gives
    save_weights(trained, tmp_path / "gpt.safetensors")
    reference = build_builtin("mlp", hidden=8).state_dict()
    init_before = dict(vars(torch.nn.init))
    others: list = []
    with uninitialised():
        assert torch.nn.init.normal_(torch.zeros(3)).tolist() == [0.0] * 3  # skipped in this thread
        worker = threading.Thread(target=lambda: others.append(build_builtin("mlp", hidden=8).state_dict()))
        worker.start()
        worker.join()
    assert len(others) == 1 and all(torch.equal(a, b) for a, b in zip(others[0].values(), reference.values()))
    assert dict(vars(torch.nn.init)) == init_before

    skipped = build_builtin("gpt", initialise=False, vocab_size=40, d_model=16, n_heads=2, n_layers=2, max_len=8)
    with mock.patch.object(models, "build_builtin", wraps=models.build_builtin) as built:
        loaded = load_model(ModelConfig(spec, weights=str(tmp_path / "gpt.safetensors")))
        load_model(ModelConfig(spec))
    assert [c.kwargs["initialise"] for c in built.call_args_list] == [False, True]  # weights to load: no init
    assert dict(vars(torch.nn.init)) == init_before
    assert skipped.lm_head.weight is skipped.tok_emb.weight and loaded.module.lm_head.weight is loaded.module.tok_emb.weight
    assert loaded.fingerprint == model_fingerprint(trained, loaded.describe)
    for (name, a), (_, b) in zip(loaded.module.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(build_builtin("mlp", hidden=8).state_dict().values(), reference.values()))


def test_dtype_casts_the_weights_and_the_fingerprint_follows():
    model = load_model(ModelConfig("mlp:hidden=8"), dtype=torch.bfloat16)
    assert model.logits(features()).dtype == torch.bfloat16
    assert model.fingerprint != load_model(ModelConfig("mlp:hidden=8")).fingerprint


# --- package.module:factory ----------------------------------------------------------------------


def test_a_factory_with_weights_from_safetensors_or_a_state_dict_file_gives_one_fingerprint(tmp_path):
    from safetensors.torch import save_file

    trained = tiny_feature_net()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-2.0)  # differ from what the factory itself returns
    save_file(trained.state_dict(), tmp_path / "w.safetensors")
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    from_st = load_model(ModelConfig("modelhelp:tiny_feature_net", weights=str(tmp_path / "w.safetensors"), task="classification"))
    from_pt = load_model(ModelConfig("modelhelp:tiny_feature_net", weights=str(tmp_path / "w.pt"), task="classification"))
    fresh = load_model(ModelConfig("modelhelp:tiny_feature_net", task="classification"))
    assert from_st.fingerprint == from_pt.fingerprint != fresh.fingerprint
    assert from_st.output_size == 5  # from the last nn.Linear
    batch = features(width=8)
    torch.testing.assert_close(from_pt.logits(batch), trained(batch["inputs"]), rtol=0, atol=0)
    assert from_st.describe["weights"].endswith("w.safetensors") and from_st.describe["factory"] == "modelhelp:tiny_feature_net"


def test_a_factory_task_comes_from_the_flag_or_the_module():
    with pytest.raises(ConfigError, match="pass --task classification or --task causal-lm"):
        load_model(ModelConfig("modelhelp:tiny_feature_net"))
    assert load_model(ModelConfig("modelhelp:tiny_feature_classifier")).task == "classification"
    with pytest.raises(ConfigError, match="does classification, not causal-lm"):
        load_model(ModelConfig("modelhelp:tiny_feature_classifier", task="causal-lm"))
    lm = load_model(ModelConfig("modelhelp:tiny_token_lm"))  # .logits output, vocab_size attribute
    assert lm.output_size == 50 and lm.logits(token_batch(50, [4, 4])).shape == (2, 4, 50)


def test_a_pickle_with_code_in_it_is_refused_without_running_the_code(tmp_path):
    live = make_malicious_pickle(tmp_path / "live.pt", tmp_path / "live-marker")
    torch.load(live, weights_only=False)  # the payload is real: unsafe loading runs it
    assert (tmp_path / "live-marker").exists()

    evil = make_malicious_pickle(tmp_path / "evil.pt", tmp_path / "marker")
    with pytest.raises(ConfigError, match="refuses to unpickle code.*convert it to safetensors"):
        load_model(ModelConfig("modelhelp:tiny_feature_classifier", weights=str(evil)))
    with pytest.raises(ConfigError, match="not a TorchScript archive"):
        load_model(ModelConfig(str(evil)))
    assert not (tmp_path / "marker").exists()


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    state = tiny_feature_net().state_dict()
    state["extra.weight"] = state.pop("out.weight")
    torch.save(state, tmp_path / "keys.pt")
    with pytest.raises(ConfigError, match=r"missing out\.weight; unexpected extra\.weight"):
        load_model(ModelConfig("modelhelp:tiny_feature_classifier", weights=str(tmp_path / "keys.pt")))
    torch.save(build_builtin("mlp", hidden=4).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ConfigError, match="size mismatch for layers.0.weight"):
        load_model(ModelConfig("mlp:hidden=8", weights=str(tmp_path / "small.pt")))
    torch.save({"model": state, "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="not a state dict of tensors"):
        load_model(ModelConfig("mlp", weights=str(tmp_path / "ckpt.pt")))


# --- TorchScript ----------------------------------------------------------------------------------


@pytest.mark.parametrize("trace", [False, True])
def test_a_torchscript_file_loads_and_its_fingerprint_ignores_the_path(tmp_path, trace):
    path = make_torchscript(tmp_path / "model.pt", trace=trace)
    model = load_model(ModelConfig(str(path), task="classification"))
    assert model.output_size == 5 and model.logits(features(width=8)).shape == (3, 5)
    shutil.copy(path, tmp_path / "copy.ts")
    assert load_model(ModelConfig(str(tmp_path / "copy.ts"), task="classification")).fingerprint == model.fingerprint
    with pytest.raises(ConfigError, match="drop --weights"):
        load_model(ModelConfig(str(path), task="classification", weights=str(path)))


# --- Hugging Face directories ---------------------------------------------------------------------


def test_a_hf_causal_lm_loads_without_remote_code_and_ignores_right_padding(hf_causal, monkeypatch):
    import transformers

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1])
    model = load_model(ModelConfig(str(hf_causal)))
    assert calls[0]["trust_remote_code"] is False and calls[0]["local_files_only"] is True
    assert (model.task, model.output_size, model.describe["kind"]) == ("causal-lm", 300, "hf")
    batch = token_batch(300, [6, 4])
    logits = model.logits(batch)
    assert logits.shape == (2, 6, 300) and logits.dtype == torch.float32
    alone = model.logits({k: v[1:, :4] for k, v in batch.items()})
    torch.testing.assert_close(logits[1, :4], alone[0], rtol=1e-5, atol=1e-5)


def test_loading_and_saving_hf_weights_draw_no_progress_bar_and_leave_the_setting_alone(hf_causal, capfd, tmp_path):
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    model = load_model(ModelConfig(str(hf_causal)))
    with quiet_hf():
        model.module.save_pretrained(tmp_path / "saved")
    err = capfd.readouterr().err  # batch-job logs stay one line per event
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert hf_logging.is_progress_bar_enabled()


def test_a_hf_classifier_pools_the_last_real_token_of_a_right_padded_row(hf_classifier):
    model = load_model(ModelConfig(str(hf_classifier)))
    assert (model.task, model.output_size) == ("classification", 3)
    assert len(json.loads(json.dumps(model.describe))["config"]["id2label"]) == 3
    batch = token_batch(299, [5, 2])
    logits = model.logits(batch)
    alone = model.logits({k: v[1:, :2] for k, v in batch.items()})
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[1], alone[0], rtol=1e-5, atol=1e-5)


def test_a_hf_fingerprint_follows_the_weights_not_the_spelling_of_the_path(hf_causal, tmp_path, monkeypatch):
    model = load_model(ModelConfig(str(hf_causal)))
    monkeypatch.chdir(hf_causal.parent)
    assert load_model(ModelConfig("./causal/")).fingerprint == model.fingerprint
    other = make_hf_causal_lm(tmp_path / "other", vocab=300, seed=1)
    assert load_model(ModelConfig(str(other))).fingerprint != model.fingerprint


def test_hf_remote_code_is_refused_unless_asked_for(tmp_path):
    marker = tmp_path / "marker"
    remote = make_hf_remote_code_dir(tmp_path / "remote", marker)
    with pytest.raises(ConfigError, match="pass --trust-remote-code if you trust"):
        load_model(ModelConfig(str(remote)))
    assert not marker.exists()


def test_hf_errors_name_the_fix(hf_causal):
    with pytest.raises(ConfigError, match="no classification weights for score.weight.*check --task"):
        load_model(ModelConfig(str(hf_causal), task="classification"))
    with pytest.raises(ConfigError, match="carries its own weights: drop --weights"):
        load_model(ModelConfig(str(hf_causal), weights=str(hf_causal / "model.safetensors")))
    with pytest.raises(ConfigError, match="read token ids"):
        load_model(ModelConfig(str(hf_causal))).logits(features())


# --- bad specs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    (dict(spec="resnet"), r"not a Hugging Face directory, TorchScript file, built-in \(mlp, cnn, gpt\) or package.module:factory"),
    (dict(spec="mlp:width=3"), r"built-in 'mlp' has no option width; its options are in_features=40, num_classes=10, hidden=256"),
    (dict(spec="mlp:hidden=big"), r"option hidden='big' must be int"),
    (dict(spec="gpt:d_model=30,n_heads=4"), r"d_model=30 is not a multiple of n_heads=4"),
    (dict(spec="mlp", weights="no/such.safetensors"), r"weights file 'no/such.safetensors' does not exist"),
    (dict(spec="./no/such/dir"), r"no such file or directory"),
    (dict(spec="modelhelp:needs_an_argument"), r"callable with no arguments"),
    (dict(spec="modelhelp:not_a_module"), r"returned a str, not a torch.nn.Module"),
    (dict(spec="no_such_module_xyz:factory"), r"cannot import 'no_such_module_xyz'"),
    (dict(spec="mlp", task="regression"), r"task 'regression' is not one of classification, causal-lm"),
    (dict(spec=""), r"model spec is empty"),
])
def test_a_bad_spec_is_one_config_error_naming_the_fix(config, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_model(ModelConfig(**config))
    assert "\n" not in str(info.value)


def test_a_directory_without_config_json_is_named(tmp_path):
    with pytest.raises(ConfigError, match="directory without config.json"):
        load_model(ModelConfig(str(tmp_path)))


def test_loaded_model_wraps_a_module_built_elsewhere():
    module = build_builtin("mlp", hidden=8).eval()
    describe = {"kind": "builtin", "name": "mlp", "options": {"hidden": 8}}
    student = LoadedModel(module, "classification", 10, model_fingerprint(module, describe), describe)
    assert student.logits(features()).shape == (3, 10)


def test_a_model_directory_appears_only_with_everything_saved_into_it(tmp_path):
    from distill.errors import WriteError
    from distill.pipeline.modelfiles import save_model

    model = load_model(ModelConfig("mlp:hidden=8"))

    def tokenizer_fails(path):
        (Path(path) / "tokenizer.json").write_text("{")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="no space left writing the model"):
        save_model(model, str(tmp_path / "model"), also=tokenizer_fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the model nor its temporary directory
    save_model(model, str(tmp_path / "model"), also=lambda path: (Path(path) / "tokenizer.json").write_text("{}"))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "model.safetensors", "tokenizer.json"]
