"""Zero-shot accuracy (fw_jax.pipeline.tasks): lm-eval's scoring checked against transformers +
PyTorch, the task files' errors, the built-in tasks, and ``fw-jax eval --tasks``."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import transformers

from fw_jax import models
from fw_jax.cli import USAGE_ERROR
from fw_jax.cli import main as cli_main
from fw_jax.pipeline import DataError
from fw_jax.pipeline.tasks import Item, Task, encode_pair, load_task, score_items, task_result
from test_pipeline_data import char_tokenizer
from test_models_gguf import smollm2, smollm2_torch  # noqa: F401  (fixtures)
from test_pipeline_prune import tiny_folder  # noqa: F401  (a fixture)

ITEMS = [
    Item("It is a truth universally ", (" acknowledged", "known", " denied"), 0),
    Item("The quick brown fox jumps over the lazy", (" dog.", " cat.", " fox."), 0),
    Item("", ("Hello", "World"), 1),  # an empty context is conditioned on BOS
    Item("x" * 300 + " and then", (" more", " less"), 1),  # longer than the model's 128 positions
]


def torch_logliks(folder: str, tokenizer, items, limit: int) -> list[list[float]]:
    """The same scoring computed with transformers + PyTorch, one request at a time, following
    lm-eval's rule: the input is (context + continuation)[-(limit + 1):][:-1] and the score is the
    sum of the continuation tokens' log-probabilities."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for item in items:
        scores = []
        for choice in item.choices:
            context, continuation = encode_pair(tokenizer, item.context, choice)
            context = context or [tokenizer.bos_token_id]
            whole = (context + continuation)[-(limit + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            n = len(continuation)
            targets = torch.tensor(whole[-n:])
            scores.append(float(logp[-n:].gather(1, targets[:, None]).sum()))
        out.append(scores)
    return out


def test_encode_pair_moves_the_context_trailing_whitespace_to_the_continuation():
    tok = char_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert encode_pair(tok, "ab  ", "c") == (ids("ab"), ids("  c"))
    assert encode_pair(tok, "ab", " c") == (ids("ab"), ids(" c"))
    assert encode_pair(tok, "", "c") == ([], ids("c"))


def test_loglikelihoods_equal_a_pytorch_computation(tiny_folder):
    loaded = models.load_model(tiny_folder)
    logliks, greedy, truncated = score_items(loaded, ITEMS, batch_size=3)
    reference = torch_logliks(tiny_folder, loaded.tokenizer, ITEMS, limit=128)
    for ours, theirs in zip(logliks, reference):
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-3)  # float32 sums of ~10–300 terms
        assert int(np.argmax(ours)) == int(np.argmax(theirs))
    assert truncated == 1
    assert all(isinstance(g, bool) for row in greedy for g in row)
    # the batch size (and with it the padding) does not change any score
    again, _, _ = score_items(loaded, ITEMS, batch_size=8)
    np.testing.assert_allclose(np.concatenate(again), np.concatenate(logliks), rtol=1e-5, atol=1e-4)


def test_accuracy_and_its_standard_error_from_the_scores():
    task = Task("t", (Item("c", ("a", "bbbb"), 1), Item("c", ("a", "bb"), 0), Item("c", ("aa", "b"), 0),
                      Item("c", ("a", "b"), 1)))
    logliks = [[-1.0, -2.0], [-1.0, -3.0], [-4.0, -1.0], [-2.0, -1.0]]
    result = task_result(task, logliks, [[False, False]] * 4)
    assert result.acc == 0.5  # argmax: 0, 0, 1, 1 against gold 1, 0, 0, 1
    assert result.acc_stderr == pytest.approx(math.sqrt(0.5 * 0.5 * 4 / 3 / 4))  # sample sd / √n
    assert result.acc_norm == 0.75  # per byte: -0.5 beats -1 in the first, -2 beats -1/1 in the third
    cloze = Task("c", (Item("x", (" a",), 0), Item("y", (" b",), 0)), kind="cloze")
    result = task_result(cloze, [[-1.0], [-2.0]], [[True], [False]])
    assert result.acc == 0.5 and result.acc_norm is None


@pytest.mark.parametrize("line, message", [
    ("not json", r"t.jsonl:2: not JSON"),
    ('["a"]', r"t.jsonl:2: expected a JSON object"),
    ('{"context": "a", "choices": [], "gold": 0}', r"t.jsonl:2: \"choices\" must be a non-empty list"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}', r"t.jsonl:2: \"gold\" must be an index into the 2"),
    ('{"context": 3, "choices": ["x"], "gold": 0}', r"t.jsonl:2: \"context\" must be a string"),
])
def test_a_bad_task_line_is_named_with_its_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "gold": 1}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_task(path)


def test_an_empty_or_missing_task_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl: no items"):
        load_task(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such task file"):
        load_task(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such built-in task"):
        load_task("builtin:hellaswag")


def test_builtin_tasks_are_deterministic_and_well_formed():
    task = load_task("builtin:pydoc-next-sentence", size=40, seed=1)
    assert task == load_task("builtin:pydoc-next-sentence", size=40, seed=1)
    assert task != load_task("builtin:pydoc-next-sentence", size=40, seed=2)
    assert len(task.items) == 40 and task.kind == "choice"
    for item in task.items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert item.choices[item.gold] not in item.context
    golds = np.bincount([item.gold for item in task.items], minlength=4)
    assert golds.min() >= 3  # the right answer is not always in the same place
    cloze = load_task("builtin:pydoc-cloze", size=30)
    assert cloze.kind == "cloze" and len(cloze.items) == 30
    assert all(len(i.choices) == 1 and i.choices[0].startswith(" ") and i.choices[0][1:].isalpha()
               for i in cloze.items)


def test_persuasion_tasks_come_from_the_corpora_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not beside ../shared
    monkeypatch.setenv("FW_JAX_CORPORA", str(tmp_path))
    sentences = [f"Anne walked to the house number {i} with her sister and her friends." for i in range(30)]
    (tmp_path / "austen_persuasion.txt").write_text(" ".join(sentences), encoding="utf-8")
    task = load_task("builtin:persuasion-next-sentence", size=10)
    assert len(task.items) == 10 and all(c[1:] in sentences for i in task.items for c in i.choices)
    monkeypatch.setenv("FW_JAX_CORPORA", str(tmp_path / "nowhere"))
    monkeypatch.setattr("fw_jax.pipeline.tasks.__file__", str(tmp_path / "a" / "b" / "c" / "tasks.py"))
    with pytest.raises(DataError, match="austen_persuasion.txt not found: set FW_JAX_CORPORA"):
        load_task("builtin:persuasion-cloze")


def test_command_line_accuracy_table_and_json(tiny_folder, tmp_path, capsys):
    tasks = tmp_path / "mc.jsonl"
    tasks.write_text("\n".join(json.dumps({"context": i.context, "choices": list(i.choices), "gold": i.gold})
                               for i in ITEMS[:2]) + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    argv = ["eval", tiny_folder, "--tasks", str(tasks), "builtin:pydoc-cloze", "--task-size", "5",
            "--json", str(out), "-q"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    header = captured.out.splitlines()[0]
    assert "mc acc" in header and "mc acc_norm" in header and "pydoc-cloze acc" in header
    assert "ppl" not in header  # no perplexity unless --data asks for it
    record = json.loads(out.read_text())
    name = os.path.basename(tiny_folder)
    mc = record["tasks"][name]["mc"]
    assert mc["items"] == 2 and 0 <= mc["acc"] <= 1 and record["tasks"][name]["pydoc-cloze"]["items"] == 5
    assert cli_main(argv) == 0  # its own file may be replaced
    capsys.readouterr()
    (tmp_path / "mine.json").write_text('{"my": "numbers"}')
    assert cli_main(argv[:-3] + ["--json", str(tmp_path / "mine.json")]) == USAGE_ERROR
    assert "was not written by fw_jax" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"my": "numbers"}'
    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    assert cli_main(["prune", tiny_folder, "--method", "wanda", "--out", str(tmp_path / "pruned"), "--calib", calib,
                     "--nsamples", "2", "--seqlen", "16", "--eval-tasks", str(tasks), "-q"]) == 0
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["model", "dense", "wanda"]  # the pruned model beside the dense one, right after pruning
    tasks.write_text('{"context": "a", "choices": ["x"], "gold": 3}\n', encoding="utf-8")
    assert cli_main(["eval", tiny_folder, "--tasks", str(tasks)]) == USAGE_ERROR
    assert f"{tasks}:1: \"gold\"" in capsys.readouterr().err


def test_evaluate_models_is_what_the_command_line_prints(tiny_folder, monkeypatch):  # noqa: F811
    """``fw_jax.pipeline.evaluate_models``, the Python face of ``fw-jax eval``: its perplexity
    and accuracies are those of the functions it combines, and it refuses lm-eval tasks
    without lm-eval (before any model runs) with lm-eval's install line."""
    from fw_jax.pipeline import evaluate_models, evaluate_perplexity, load_documents
    from fw_jax.pipeline.harness import HarnessError
    from fw_jax.pipeline.tasks import evaluate_tasks

    calib = os.path.join(os.path.dirname(tiny_folder), "calib.txt")
    task = Task("mc", tuple(ITEMS[:2]))
    result = evaluate_models({"tiny": tiny_folder}, data=calib, seqlen=16, max_windows=2, tasks=[task], progress=False)
    ppl = evaluate_perplexity({"tiny": tiny_folder}, load_documents(calib, split="evaluation"), seqlen=16,
                              max_windows=2, progress=False)["tiny"]
    acc = evaluate_tasks({"tiny": tiny_folder}, [task], progress=False)["tiny"]["mc"]
    assert result.table["tiny"][f"{calib} ppl"] == pytest.approx(ppl, rel=1e-6)
    assert result.table["tiny"]["mc acc"] == f"{100 * acc.acc:.1f} ± {100 * acc.acc_stderr:.1f}"
    assert result.record["written_by"] == "fw_jax" and result.record["tasks"]["tiny"]["mc"]["items"] == 2
    assert result.record["perplexity"]["results"]["tiny"] == pytest.approx(ppl, rel=1e-6)
    assert any(note.startswith("perplexity: the first 2 windows") for note in result.notes)
    import fw_jax.pipeline.harness as harness

    monkeypatch.setattr(harness, "lm_eval_available", lambda: False)  # as where the extra is not installed
    with pytest.raises(HarnessError, match="pip install"):
        evaluate_models({"tiny": "no/such/model"}, lm_eval_tasks=["boolq"], progress=False)


@pytest.mark.slow
def test_smollm2_loglikelihoods_equal_a_pytorch_computation(smollm2, smollm2_torch):
    loaded, reference = smollm2, smollm2_torch  # the GGUF model in fw_jax and in transformers
    items = load_task("builtin:pydoc-next-sentence", size=6).items
    logliks, _, _ = score_items(loaded, items)
    for item, ours in zip(items, logliks):
        theirs = []
        for choice in item.choices:
            context, continuation = encode_pair(loaded.tokenizer, item.context, choice)
            whole = context + continuation
            with torch.no_grad():
                logp = torch.log_softmax(reference(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            n = len(continuation)
            theirs.append(float(logp[-n:].gather(1, torch.tensor(whole[-n:])[:, None]).sum()))
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=5e-2)
        assert int(np.argmax(ours)) == int(np.argmax(theirs))


def test_sentences_do_not_end_at_abbreviations_or_initials():
    from fw_jax.pipeline.tasks import _sentences

    text = ("It was Mr. Elliot who came first to the house that morning. Then Mrs. Clay followed him, "
            "e.g. The rest of them came later that day. A letter from J. Smith was read to them all aloud.")
    assert _sentences(text) == [
        "It was Mr. Elliot who came first to the house that morning.",
        "Then Mrs. Clay followed him, e.g. The rest of them came later that day.",
        "A letter from J. Smith was read to them all aloud.",
    ]
