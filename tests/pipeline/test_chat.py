"""Chat data: a messages column rendered with a chat template, positions on the assistant's tokens."""

import re

import numpy as np
import pytest
from click.testing import CliRunner

from datahelp import (CHATML_TEMPLATE, make_chat_tokenizer, make_hf_tokenizer, save_hf_dataset, write_jsonl,
                      write_module, write_parquet, write_text)
from distill.cli import cli
from distill.errors import ConfigError
from distill.pipeline.chat import chat_rule_difference
from distill.pipeline.data import DataConfig, load_data
from distill.storage import open_store

CONVERSATIONS = [
    [{"role": "user", "content": "hello cat"}, {"role": "assistant", "content": "the cat sat on the mat"}],
    [{"role": "system", "content": "be a teacher"}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "hello student"}, {"role": "user", "content": "a dog?"},
     {"role": "assistant", "content": "a dog ran after the cat"}],
    [{"role": "user", "content": "call the tool"}, {"role": "assistant", "content": "calling"},
     {"role": "tool", "content": "42"}, {"role": "assistant", "content": "the answer is 42"}],
    [{"role": "assistant", "content": "the student learns"}, {"role": "user", "content": "ok"}],
]
# a template unlike the tokenizer's ChatML one, for --chat-template FILE
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_chat_tokenizer(tmp_path_factory.mktemp("chat-tok"))


@pytest.fixture(scope="module")
def hf(tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))


@pytest.fixture
def chat_jsonl(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])


def load(spec, tokenizer, **kw):
    return load_data(DataConfig(str(spec), tokenizer=str(tokenizer), **kw))


def rows(data):
    """[(ids (L,), position mask (L,))] per sequence, as numpy."""
    return [(data[i]["input_ids"].numpy(), data[i]["position_mask"].numpy()) for i in range(len(data))]


def naive_mask(hf, ids, assistant_pattern):
    """The reference: decode token by token, find the assistant turns in the text with a regex,
    and keep position t iff token t+1 overlaps one (the last token predicts nothing)."""
    pieces = [hf.decode([i]) for i in ids]
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - [len(p) for p in pieces]
    spans = [m.span(1) for m in re.finditer(assistant_pattern, text, re.S)]
    target = np.array([any(s < b and e > a for a, b in spans) for s, e in zip(starts, ends)])
    mask = np.zeros(len(ids), bool)
    mask[:-1] = target[1:]
    return text, mask


def targets_text(hf, ids, mask):
    return hf.decode(ids[1:][mask[:-1]])


def test_positions_are_the_assistant_tokens(chat_jsonl, tokenizer, hf):
    data = load(chat_jsonl, tokenizer)
    assert data.task == "causal-lm" and data.has_position_mask and len(data) == len(CONVERSATIONS)
    for (ids, mask), conversation in zip(rows(data), CONVERSATIONS):
        text, expected = naive_mask(hf, ids, r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)")
        assert text == hf.apply_chat_template(conversation, tokenize=False)
        assert text.count("[BOS]") == 1 and ids[0] == hf.bos_token_id  # the template's BOS, not added twice
        np.testing.assert_array_equal(mask, expected)
        answers = "".join(m["content"] + "<|im_end|>\n" for m in conversation if m["role"] == "assistant")
        assert targets_text(hf, ids, mask) == answers


def test_train_on_all_keeps_every_position_but_the_last(chat_jsonl, tokenizer, hf):
    assistant = rows(load(chat_jsonl, tokenizer))
    everything = rows(load(chat_jsonl, tokenizer, train_on="all"))
    for (ids, mask), (ids_a, mask_a) in zip(everything, assistant):
        np.testing.assert_array_equal(ids, ids_a)
        assert mask[:-1].all() and not mask[-1]
        assert (mask >= mask_a).all() and mask.sum() > mask_a.sum()
    data = load(chat_jsonl, tokenizer, train_on="all")
    assert data.fingerprint() != load(chat_jsonl, tokenizer).fingerprint()  # a store records the rule


def test_chat_template_file_overrides_the_tokenizers(chat_jsonl, tokenizer, hf, tmp_path):
    template = write_text(tmp_path / "plain.jinja", PLAIN_TEMPLATE)
    data = load(chat_jsonl, tokenizer, chat_template=str(template))
    for (ids, mask), conversation in zip(rows(data), CONVERSATIONS):
        text, expected = naive_mask(hf, ids, r"assistant: (.*?<\|im_end\|>)")
        assert text == "".join(f"{m['role']}: {m['content']}<|im_end|>" for m in conversation)
        np.testing.assert_array_equal(mask, expected)
        answers = "".join(m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant")
        # BPE merges the space after "assistant:" into " the": a token that straddles into the answer is the answer's
        assert targets_text(hf, ids, mask).replace(" ", "") == answers.replace(" ", "")


def test_byte_tokenizer_with_a_template_file(chat_jsonl, tmp_path):
    template = write_text(tmp_path / "plain.jinja", PLAIN_TEMPLATE)
    data = load(chat_jsonl, "bytes", chat_template=str(template))
    ids, mask = rows(data)[0]
    assert bytes(ids.tolist()).decode() == "user: hello cat<|im_end|>assistant: the cat sat on the mat<|im_end|>"
    assert bytes(ids[1:][mask[:-1]].tolist()).decode() == "the cat sat on the mat<|im_end|>"


def test_every_table_source_gives_the_same_examples(chat_jsonl, tokenizer, tmp_path, monkeypatch):
    import json

    expected = rows(load(chat_jsonl, tokenizer))
    columns = {"messages": CONVERSATIONS}
    sources = [write_parquet(tmp_path / "p" / "chat.parquet", columns), save_hf_dataset(tmp_path / "ds", columns),
               write_jsonl(tmp_path / "j" / "chat.jsonl", [{"messages": json.dumps(c)} for c in CONVERSATIONS]),
               # a key only some messages have: the others' null in the struct column is left out again
               write_jsonl(tmp_path / "k" / "chat.jsonl", [{"messages": [{**m, "name": "x"} if m["role"] == "tool" else m
                                                                         for m in c]} for c in CONVERSATIONS])]
    module = write_module(tmp_path, "chatdata", f"""
        def conversations(split):
            return [{{"messages": c}} for c in {CONVERSATIONS!r}]
        """, monkeypatch)
    for spec in [*sources, f"{module}:conversations"]:
        got = rows(load(spec, tokenizer))
        assert len(got) == len(expected), spec
        for (ids, mask), (ids_e, mask_e) in zip(got, expected):
            np.testing.assert_array_equal(ids, ids_e)
            np.testing.assert_array_equal(mask, mask_e)


def test_long_conversations_are_cut_into_windows(chat_jsonl, tokenizer):
    whole = rows(load(chat_jsonl, tokenizer))
    data = load(chat_jsonl, tokenizer, seq_len=8)
    assert max(len(ids) for ids, _ in rows(data)) == 8 and len(data) > len(whole)
    for got, expected in zip(zip(*rows(data)), zip(*whole)):  # the windows, end to end, are the conversations
        np.testing.assert_array_equal(np.concatenate(got), np.concatenate(expected))
    assert data.stats["positions"] == sum(int(mask.sum()) for _, mask in whole) and data.stats["dropped_tokens"] == 0


def test_limit_and_explicit_columns(chat_jsonl, tokenizer, tmp_path):
    assert len(load(chat_jsonl, tokenizer, limit=2)) == 2
    both = write_jsonl(tmp_path / "both.jsonl", [{"messages": c, "text": "the cat"} for c in CONVERSATIONS])
    assert load(both, tokenizer).has_position_mask  # messages wins over text when no column is named
    assert not load(both, tokenizer, text_column="text", task="causal-lm").has_position_mask


GOOD = CONVERSATIONS[0]


@pytest.mark.parametrize("conversations, message", [
    ([GOOD, [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]],
     "row 1 of column 'messages' has a message with role 'robot'; roles must be one of system, user, assistant, tool"),
    ([GOOD, []], "row 1 of column 'messages' has no messages; drop empty conversations"),
    ([GOOD, [{"content": "who am I"}]], "row 1 of column 'messages' has a message with role None"),
    ([[{"role": "user", "content": "hi"}]], "no conversation has an assistant turn to train on; "
                                            "add assistant messages or pass --train-on all"),
])
def test_bad_conversations(tmp_path, tokenizer, conversations, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": c} for c in conversations])
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load(path, tokenizer)
    assert "\n" not in str(e.value)


def test_tokenizer_without_a_template(chat_jsonl, tmp_path):
    plain = make_hf_tokenizer(tmp_path / "plain")
    for spec in (plain, "bytes"):
        with pytest.raises(ConfigError, match=r"has no chat template .* pass --chat-template FILE") as e:
            load(chat_jsonl, spec)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="must be tokenised: pass --tokenizer"):
        load_data(DataConfig(str(chat_jsonl)))


def test_template_errors(chat_jsonl, tokenizer, tmp_path):
    # the last line depends on the whole conversation, so a beginning is not a prefix of the whole
    counting = write_text(tmp_path / "counting.jinja", CHATML_TEMPLATE + "{{ messages | length }}")
    with pytest.raises(ConfigError, match="renders a conversation's beginning differently .* or --train-on all"):
        load(chat_jsonl, tokenizer, chat_template=str(counting))
    assert load(chat_jsonl, tokenizer, chat_template=str(counting), train_on="all").has_position_mask
    raising = write_text(tmp_path / "raising.jinja", "{{ raise_exception('no tools here') }}")
    with pytest.raises(ConfigError, match="row 0: the chat template fails .*no tools here"):
        load(chat_jsonl, tokenizer, chat_template=str(raising))
    with pytest.raises(ConfigError, match="cannot read --chat-template"):
        load(chat_jsonl, tokenizer, chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="unknown --train-on 'prompts': use assistant, all"):
        load(chat_jsonl, tokenizer, train_on="prompts")
    with pytest.raises(ConfigError, match="chat data, which is causal-lm"):
        load(chat_jsonl, tokenizer, task="classification")


def cli_run(*args):
    result = CliRunner().invoke(cli, [*map(str, args), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return result


def test_cli_generate_and_train_on_chat_data(chat_jsonl, tmp_path):
    from modelhelp import make_hf_causal_lm

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for directory in (teacher, student):
        make_hf_causal_lm(directory, vocab=302)
        make_chat_tokenizer(directory)  # 300 BPE ids + 2 turn markers: the models' 302
    store = tmp_path / "store"
    cli_run("generate-labels", "--teacher", teacher, "--data", chat_jsonl, "--out", store, "--k", 4)
    expected = load(chat_jsonl, teacher)
    targets = sum(int(item["position_mask"].sum()) for item in (expected[i] for i in range(len(expected))))
    reader = open_store(str(store))
    assert reader.num_positions == targets and reader.spec.extra["data"]["chat"] == expected.stats["chat"]
    assert expected.stats["chat"]["train_on"] == "assistant"
    cli_run("train-student", "--labels", store, "--student", student, "--data", chat_jsonl, "--steps", 2,
            "--out", tmp_path / "run")
    result = CliRunner().invoke(cli, ["train-student", "--labels", str(store), "--student", str(student), "--data",
                                      str(chat_jsonl), "--steps", "2", "--train-on", "all", "--device", "cpu",
                                      "--out", str(tmp_path / "run2"), "--no-progress"])
    assert result.exit_code == 2
    assert ("made from chat data with --train-on assistant, but this data is read with --train-on all: "
            "pass --train-on assistant as generate-labels had") in result.output


def test_chat_rule_is_in_the_stats_and_a_difference_is_named(chat_jsonl, tokenizer, tmp_path):
    template = write_text(tmp_path / "plain.jinja", PLAIN_TEMPLATE)
    own = load(chat_jsonl, tokenizer).stats["chat"]
    other = load(chat_jsonl, tokenizer, chat_template=str(template)).stats["chat"]
    assert own["template_sha256"] != other["template_sha256"] and own["train_on"] == other["train_on"]
    assert chat_rule_difference(own, dict(own)) is None and chat_rule_difference(None, own) is None
    assert "pass the same --chat-template (or tokenizer) as generate-labels" in chat_rule_difference(own, other)
