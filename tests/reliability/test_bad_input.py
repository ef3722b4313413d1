"""Wrong invocations of the CLI: one line naming the problem and the fix, exit 2, nothing left as complete."""

from pathlib import Path

import pytest

from killhelp import DATA, GENERATE, one_line_error, run

TEACHER = ["--teacher", "slowteacher:fast_factory", "--data", DATA, "--no-progress"]
STUDENT = ["--student", "faultdata:student", "--data", DATA, "--steps", "2", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the invocations point at: stores, files, configs."""
    root = tmp_path_factory.mktemp("bad-input")
    run(*GENERATE, "--out", root / "labels")  # complete: k=3, vocabulary 10, temperatures 1 and 2
    run(*GENERATE, "--out", root / "half", "--shard", "0/2")  # every other shard
    (root / "a-file").write_text("not a store")
    (root / "not-a-store").mkdir()
    (root / "not-a-store" / "precious.txt").write_text("x")
    (root / "broken.toml").write_text("[generate-labels]\nk = = 3\n")
    (root / "typo.toml").write_text("[train-student]\nbatch_sise = 3\n")
    (root / "top-typo.toml").write_text("temprature = 2.0\n")
    (root / "table-typo.toml").write_text("[generate-label]\nk = 3\n")
    (root / "twice.toml").write_text("[generate-labels]\ntemperature = [2.0]\ntemperatures = [3.0]\n")
    (root / "list.toml").write_text("temperature = [1.0, 2.0]\n")
    return root


# (argv with {w} = the fixture folder, {out} = a fresh output path, {ro} = a read-only folder; problem; fix)
CASES = {
    # generate-labels
    "generate without --out": (["generate-labels", *TEACHER], "missing --out", "pass the path"),
    "generate without --teacher": (["generate-labels", "--data", DATA, "--out", "{out}"], "missing --teacher", "needs both"),
    "generate data file missing": (["generate-labels", *TEACHER[:2], "--data", "{w}/no-such.parquet", "--out", "{out}"],
                                   "no-such.parquet", "check the path"),
    "generate out is a file": (["generate-labels", *TEACHER, "--out", "{w}/a-file"], "is a file", "pass a directory"),
    "generate out holds other files": (["generate-labels", *TEACHER, "--out", "{w}/not-a-store"], "not empty",
                                       "choose a new path"),
    "generate k 0": (["generate-labels", *TEACHER, "--k", "0", "--out", "{out}"], "--k must be at least 1", "got 0"),
    "generate k above vocabulary": (["generate-labels", *TEACHER, "--k", "11", "--out", "{out}"],
                                    "larger than the teacher's output size (10)", "use --k 10 or less"),
    "generate temperature 0": (["generate-labels", *TEACHER, "--temperature", "0", "--out", "{out}"],
                               "temperatures must be finite and > 0", "e.g. --temperature 2"),
    "generate temperature negative": (["generate-labels", *TEACHER, "--temperature", "-1", "--out", "{out}"],
                                      "temperatures must be finite and > 0", "e.g. --temperature 2"),
    "generate batch size 0": (["generate-labels", *TEACHER, "--batch-size", "0", "--out", "{out}"],
                              "--batch-size must be at least 1", "got 0"),
    "generate shard size 0": (["generate-labels", *TEACHER, "--examples-per-shard", "0", "--out", "{out}"],
                              "--examples-per-shard must be at least 1", "got 0"),
    "generate unknown model": (["generate-labels", "--teacher", "nosuchmodel", "--data", DATA, "--out", "{out}"],
                               "model spec 'nosuchmodel'", "check the spelling"),
    "generate unimportable factory": (["generate-labels", "--teacher", "no_such_pkg.mod:make", "--data", DATA, "--out", "{out}"],
                                      "cannot import 'no_such_pkg.mod'", "check the name and PYTHONPATH"),
    "generate unknown data": (["generate-labels", *TEACHER[:2], "--data", "no_such_data_xyz", "--out", "{out}"],
                              "data spec 'no_such_data_xyz'", "check the path"),
    "generate malformed config": (["generate-labels", "--config", "{w}/broken.toml", "--out", "{out}"],
                                  "is not valid TOML", "fix the line"),
    "generate missing config": (["generate-labels", "--config", "{w}/none.toml", "--out", "{out}"], "does not exist",
                                "check the --config path"),
    "generate bad shard": (["generate-labels", *TEACHER, "--shard", "3/2", "--out", "{out}"], "--shard '3/2'", "I/N"),
    "generate weights missing": (["generate-labels", *TEACHER, "--weights", "{w}/none.safetensors", "--out", "{out}"],
                                 "does not exist", "check --weights"),
    "generate read-only out": (["generate-labels", *TEACHER, "--out", "{ro}/store"], "cannot write",
                               "writable directory"),
    "generate teacher of no licence when one is required": (["generate-labels", *TEACHER, "--require-known-license",
                                                              "--out", "{out}"], "declares no licence",
                                                             "pass --accept-teacher-license unknown"),
    "generate unknown method": (["generate-labels", *TEACHER, "--method", "argmax", "--out", "{out}"],
                                "Invalid value for '--method'", "--help"),
    "generate k not a number": (["generate-labels", *TEACHER, "--k", "many", "--out", "{out}"],
                                "'many' is not a valid integer", "--help"),
    "generate store with other settings": (["generate-labels", *TEACHER, "--k", "4", "--temperature", "2", "--out", "{w}/labels"],
                                           "written with k=3, not 4", "--overwrite"),
    "finalize an incomplete store": (["generate-labels", "--finalize", "--out", "{w}/half"], "6 shard(s) not complete",
                                     "rerun generation"),
    "finalize a missing store": (["generate-labels", "--finalize", "--out", "{out}"], "no store at", "check the path"),
    # train-student
    "train labels missing": (["train-student", "--labels", "{w}/none", *STUDENT, "--out", "{out}"], "no store at",
                             "check the path"),
    "train labels is a file": (["train-student", "--labels", "{w}/a-file", *STUDENT, "--out", "{out}"], "is a file",
                               "pass the store's directory"),
    "train labels not a store": (["train-student", "--labels", "{w}/not-a-store", *STUDENT, "--out", "{out}"],
                                 "no manifest.json", "not a distill store"),
    "train labels incomplete": (["train-student", "--labels", "{w}/half", *STUDENT, "--out", "{out}"],
                                "is not complete (6 of 12 shards)", "finish it"),
    "train temperature not stored": (["train-student", "--labels", "{w}/labels", *STUDENT, "--temperature", "3",
                                      "--out", "{out}"], "temperature 3 is not in the store", "regenerate the labels"),
    "train temperature 0": (["train-student", "--labels", "{w}/labels", *STUDENT, "--temperature", "0", "--out", "{out}"],
                            "--temperature must be finite and > 0", "got 0"),
    "train alpha below 0": (["train-student", "--labels", "{w}/labels", *STUDENT, "--alpha", "-0.1", "--out", "{out}"],
                            "--alpha must be in [0, 1]", "got -0.1"),
    "train alpha above 1": (["train-student", "--labels", "{w}/labels", *STUDENT, "--alpha", "1.5", "--out", "{out}"],
                            "--alpha must be in [0, 1]", "got 1.5"),
    "train student vocabulary differs": (["train-student", "--labels", "{w}/labels", *STUDENT[2:], "--student",
                                          "mlp:in_features=40,num_classes=7", "--out", "{out}"],
                                         "outputs 7 values but the store's vocabulary is 10", "use a student"),
    "train data not the store's": (["train-student", "--labels", "{w}/labels", *STUDENT, "--limit", "100", "--out", "{out}"],
                                   "made from other data", "pass the same --data"),
    "train unknown student": (["train-student", "--labels", "{w}/labels", *STUDENT[2:], "--student", "nosuchmodel",
                               "--out", "{out}"], "model spec 'nosuchmodel'", "check the spelling"),
    "train unknown data": (["train-student", "--labels", "{w}/labels", *STUDENT[:2], "--data", "no_such_data_xyz",
                            "--steps", "2", "--out", "{out}"], "data spec 'no_such_data_xyz'", "check the path"),
    "train malformed config": (["train-student", "--config", "{w}/broken.toml", "--out", "{out}"], "is not valid TOML",
                               "fix the line"),
    "train config unknown key": (["train-student", "--config", "{w}/typo.toml", "--out", "{out}"],
                                 "unknown key 'batch_sise'", "valid keys"),
    "train out is a file": (["train-student", "--labels", "{w}/labels", *STUDENT, "--out", "{w}/a-file"],
                            "is a file, not a run directory", "choose a new --out"),
    "train out holds other files": (["train-student", "--labels", "{w}/labels", *STUDENT, "--out", "{w}/not-a-store"],
                                    "not a distill run directory", "choose a new --out"),
    "train read-only out": (["train-student", "--labels", "{w}/labels", *STUDENT, "--out", "{ro}/run"], "cannot write",
                            "writable directory"),
    "train epochs and steps": (["train-student", "--labels", "{w}/labels", *STUDENT, "--epochs", "1", "--out", "{out}"],
                               "--epochs or --steps, not both", "pass --epochs"),
    "train batch size 0": (["train-student", "--labels", "{w}/labels", *STUDENT, "--batch-size", "0", "--out", "{out}"],
                           "--batch-size must be at least 1", "got 0"),
    "train learning rate 0": (["train-student", "--labels", "{w}/labels", *STUDENT, "--lr", "0", "--out", "{out}"],
                              "--lr must be > 0", "--min-lr-ratio"),
    "config unknown top-level key": (["generate-labels", "--config", "{w}/top-typo.toml", "--out", "{out}"],
                                     "unknown key 'temprature', which no command has", "did you mean 'temperature'?"),
    "config unknown table": (["generate-labels", "--config", "{w}/table-typo.toml", "--out", "{out}"],
                             "unknown table [generate-label]", "did you mean 'generate-labels'?"),
    "config one setting twice": (["generate-labels", "--config", "{w}/twice.toml", "--out", "{out}"],
                                 "keys 'temperature' and 'temperatures' set the same setting", "keep one"),
    "config list for a one-value flag": (["train-student", "--config", "{w}/list.toml", "--labels", "{w}/labels",
                                          *STUDENT, "--out", "{out}"], "temperature = [1.0, 2.0] is a list",
                                         "give one"),
    "train labels in memory": (["train-student", "--labels", "memory://x/store", *STUDENT, "--out", "{out}"],
                               "memory://x/store cannot hold a store here", "pass the path or URL"),
    # import-labels
    "import without --out": (["import-labels", "--data", DATA], "missing --out", "pass the path of the store"),
    "import without --data": (["import-labels", "--out", "{out}"], "missing --data", "pass the data the labels belong to"),
    "import source missing": (["import-labels", "--data", DATA, "--source", "{w}/nowhere.parquet", "--out", "{out}"],
                              "the source", "pass --source"),
    "import k 0": (["import-labels", "--data", DATA, "--k", "0", "--out", "{out}"], "--k must be at least 1", "got 0"),
    "import negative mass tolerance": (["import-labels", "--data", DATA, "--mass-tolerance", "-1", "--out", "{out}"],
                                       "--mass-tolerance must be at least 0", "got -1"),
    "train unknown loss": (["train-student", "--labels", "{w}/labels", *STUDENT, "--loss", "mse", "--out", "{out}"],
                           "Invalid value for '--loss'", "--help"),
    # inspect, evaluate
    "inspect missing path": (["inspect", "{w}/none"], "no store at", "check the path"),
    "inspect a file": (["inspect", "{w}/a-file"], "is neither a soft-label store", "pass one of those"),
    "inspect not a store": (["inspect", "{w}/not-a-store"], "neither a soft-label store", "pass one of those"),
    "inspect a store in memory": (["inspect", "memory://x/store"], "memory://x/store cannot hold a store here",
                                  "pass the path or URL"),
    "inspect negative sample": (["inspect", "{w}/labels", "--sample", "-1"], "--sample must be at least 0", "got -1"),
    "evaluate unknown model": (["evaluate", "--model", "nosuchmodel", "--data", DATA], "model spec 'nosuchmodel'",
                               "check the spelling"),
}


# language-model data and models (issue 16); {lm} = the lm_world folder. Besides nothing complete: nothing at all written
LM_GPT = "gpt:d_model=16,n_layers=1,n_heads=2,max_len=32"
LM_TEXT = ["--data", "{lm}/corpus.txt", "--tokenizer", "bytes", "--no-progress"]
LM_STUDENT = ["--labels", "{lm}/labels", *LM_TEXT, "--steps", "1", "--workers", "0"]
LM_CASES = {
    "generate seq-len past the context": (["generate-labels", "--teacher", LM_GPT, *LM_TEXT, "--seq-len", "64", "--out", "{out}"],
                                          "--seq-len 64 is longer than the teacher's context length (32 tokens)",
                                          "pass --seq-len 32 or less"),
    "teacher seq-len past the context": (["train-teacher", "--model", LM_GPT, *LM_TEXT, "--seq-len", "64", "--out", "{out}"],
                                         "--seq-len 64 is longer than the model's context length (32 tokens)",
                                         "pass --seq-len 32 or less"),
    "student seq-len past the context": (["train-student", "--student", LM_GPT, *LM_STUDENT, "--seq-len", "64", "--out",
                                          "{out}"], "longer than the student's context length (32 tokens)", "32 or less"),
    "student vocabulary smaller than the teacher's": (
        ["train-student", "--student", "gpt:vocab_size=200,d_model=16,n_layers=1,n_heads=2,max_len=32", *LM_STUDENT,
         "--out", "{out}"], "outputs 200 values but the teacher's vocabulary is 256", "at least 256 outputs"),
    "chat data without a chat template": (["generate-labels", "--teacher", "{lm}/plain-teacher", "--data", "{lm}/chat.jsonl",
                                           "--out", "{out}", "--no-progress"], "has no chat template",
                                          "pass --chat-template FILE"),
    "chat message of an unknown role": (["generate-labels", "--teacher", "{lm}/chat-teacher", "--data", "{lm}/robot.jsonl",
                                         "--out", "{out}", "--no-progress"], "role 'robot'",
                                        "roles must be one of system, user, assistant, tool"),
    "pack without an end-of-text token": (["generate-labels", "--teacher", LM_GPT, *LM_TEXT, "--pack", "--out", "{out}"],
                                          "--pack needs an end-of-text token", "drop --pack"),
    "stride as long as the window": (["generate-labels", "--teacher", LM_GPT, *LM_TEXT, "--seq-len", "16", "--stride", "16",
                                      "--out", "{out}"], "--stride 16 must be an integer less than --seq-len 16",
                                     "e.g. --stride 4"),
    "lora on a built-in student": (["train-teacher", "--model", LM_GPT, *LM_TEXT, "--steps", "1", "--lora-r", "4", "--out",
                                    "{out}"], "--lora-r 4 applies to Hugging Face models", "drop the flag"),
    "gradient checkpointing on a built-in": (["train-teacher", "--model", LM_GPT, *LM_TEXT, "--steps", "1",
                                              "--gradient-checkpointing", "--out", "{out}"],
                                             "--gradient-checkpointing applies to Hugging Face models", "drop the flag"),
    "fsdp in one process": (["train-teacher", "--model", LM_GPT, *LM_TEXT, "--steps", "1", "--distributed", "fsdp",
                             "--out", "{out}"], "--distributed fsdp shards the model across torchrun's processes",
                            "launch with torchrun"),
    "held-out evaluation on the only split": (["train-teacher", "--model", LM_GPT, *LM_TEXT, "--steps", "1",
                                               "--eval-every", "1", "--out", "{out}"],
                                              "has one split, which is the training data", "pass --eval-data HELD_OUT"),
    "import a column the source lacks": (["import-labels", "--data", "{lm}/topk.parquet", "--vocab-size", "256",
                                          "--topk-ids-column", "nope", "--no-progress", "--out", "{out}"],
                                         "has no column 'nope'", "fix --topk-ids-column"),
    "import labels that sum past 1": (["import-labels", "--data", "{lm}/over.parquet", "--vocab-size", "256",
                                       "--no-progress", "--out", "{out}"], "more than 1",
                                      "give log-probabilities under the teacher's full-vocabulary softmax"),
    "import labels past the vocabulary": (["import-labels", "--data", "{lm}/topk.parquet", "--vocab-size", "5",
                                           "--no-progress", "--out", "{out}"], "outside the vocabulary [0, 5)",
                                          "pass the teacher's --vocab-size"),
    "teacher whose licence restricts training on its outputs": (
        ["generate-labels", "--teacher", "{lm}/llama-teacher", "--data", "{lm}/corpus.txt", "--out", "{out}",
         "--no-progress"], "the teacher's licence 'llama2' (from its README.md)",
        "pass --accept-teacher-license llama2"),
    "unknown metrics sink": (["train-teacher", "--model", LM_GPT, *LM_TEXT, "--steps", "1", "--log-to", "mlflow", "--out",
                              "{out}"], "unknown --log-to 'mlflow'", "use tensorboard, wandb"),
}


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory):
    """A byte-level corpus and its store, chat data, and Hugging Face teachers with and without a chat template."""
    from datahelp import make_chat_tokenizer, make_hf_tokenizer, write_jsonl, write_parquet
    from modelhelp import make_hf_causal_lm

    root = tmp_path_factory.mktemp("bad-lm-input")
    (root / "corpus.txt").write_text("offline labels teach a small student. " * 20)
    run("generate-labels", "--teacher", LM_GPT, *[a.format(lm=root) for a in LM_TEXT], "--out", root / "labels",
        "--k", "4")
    make_hf_tokenizer(make_hf_causal_lm(root / "plain-teacher", vocab=300))
    make_chat_tokenizer(make_hf_causal_lm(root / "chat-teacher", vocab=302))
    llama = make_hf_tokenizer(make_hf_causal_lm(root / "llama-teacher", vocab=300))
    (llama / "README.md").write_text("---\nlicense: llama2\n---\n# a teacher under the Llama 2 licence\n")
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    write_jsonl(root / "chat.jsonl", [{"messages": chat}])
    write_jsonl(root / "robot.jsonl", [{"messages": chat}, {"messages": [{"role": "robot", "content": "beep"}]}])
    rows = [[1, 2, 3], [4, 5, 6, 7]]  # top-2 labels per token, as other tools export them
    ids = [[[1, 9], [2, 8], [3, 7]], [[4, 5], [6, 7], [8, 9], [1, 2]]]
    write_parquet(root / "topk.parquet", {"input_ids": rows, "topk_ids": ids,
                                         "topk_logprobs": [[[-0.5, -2.0]] * len(r) for r in rows]})
    write_parquet(root / "over.parquet", {"input_ids": rows, "topk_ids": ids,
                                         "topk_logprobs": [[[-0.1, -0.2]] * len(r) for r in rows]})
    return root


@pytest.mark.parametrize("case", LM_CASES)
def test_a_wrong_language_model_invocation_is_one_line_exit_2_and_writes_nothing(case, lm_world, tmp_path):
    argv, problem, fix = LM_CASES[case]
    argv = [a.format(lm=lm_world, out=tmp_path / "out") for a in argv]
    before = _complete_things(lm_world)
    one_line_error(run(*argv, ok=False), problem, fix)
    assert not (tmp_path / "out").exists() and _complete_things(lm_world) == before


def _complete_things(root: Path) -> set:
    """What a later run would take for complete under ``root``: commit records, sealed manifests, checkpoints, models."""
    found = {str(p.relative_to(root)) for p in root.rglob("*.commit.json")}
    found |= {str(p.relative_to(root)) for p in root.rglob("latest")}
    found |= {str(p.relative_to(root)) for p in root.rglob("model") if p.is_dir()}
    found |= {str(p.relative_to(root)) for p in root.rglob("manifest.json") if '"finalized": true' in p.read_text()}
    return found


@pytest.mark.parametrize("case", CASES)
def test_a_wrong_invocation_is_one_line_exit_2_and_leaves_nothing_complete(case, world, tmp_path, read_only):
    argv, problem, fix = CASES[case]
    argv = [a.format(w=world, out=tmp_path / "out", ro=read_only) for a in argv]
    before = _complete_things(world), _complete_things(tmp_path)
    one_line_error(run(*argv, ok=False), problem, fix)
    assert (_complete_things(world), _complete_things(tmp_path)) == before
