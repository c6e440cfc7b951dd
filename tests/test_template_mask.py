"""Assistant-only loss: labels built by TRL's own SFTTrainer preparation with the Vicuna template.

Properties over many random English/Arabic multi-turn conversations, with and without a system prompt,
padded, padding-free, packed and truncated: no human or system token is trained; every assistant token
and its ``</s>`` is (for truncation: every assistant token that survives).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from bimedix.training.masking import TRAIN_CLOSE, TRAIN_OPEN, assistant_token_mask, mask_summary, render_mask
from bimedix.training.sft import RequireTrainedTokens
from bimedix.training.tiny import build_tiny_model

EN = ("the", "patient", "has", "fever", "of", "39°C", "for", "3", "days;", "take", "500mg", "paracetamol",
      "(twice)",
      "chest", "pain?", "ECG", "shows", "ST-elevation.", "USER:", "ASSISTANT:", "</s>-like", "\n", "e.g.",
      "HbA1c")
AR = ("المريض", "يعاني", "من", "حمى", "منذ", "٣", "أيام", "،", "تناول", "باراسيتامول", "٥٠٠", "ملغ", "ألم",
      "في",
      "الصدر؟", "تخطيط", "القلب", "يُظهر", "ارتفاعاً", ".", "السُّكَّري", "USER:", "\n", "ـــ")
N_CONVERSATIONS = 48


def _text(rng: random.Random, words) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14))).strip() or words[0]


def _conversation(rng: random.Random) -> list[dict]:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": _text(rng, EN if rng.random() < 0.5 else AR)})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _text(rng, EN if rng.random() < 0.5 else AR)})
        messages.append({"role": "assistant", "content": _text(rng, EN if rng.random() < 0.5 else AR)})
    return messages


@pytest.fixture(scope="module")
def conversations():
    rng = random.Random(1234)
    return [_conversation(rng) for _ in range(N_CONVERSATIONS)]


@pytest.fixture(scope="module")
def prepare(mixtral_tokenizer, conversations, tmp_path_factory):
    """Run TRL's dataset preparation (and collator) for a given SFTConfig variant."""
    model = build_tiny_model("mixtral")
    cache = {}

    def run(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("mask")), use_cpu=True, bf16=False,
                             assistant_only_loss=True, activation_checkpointing=False, report_to="none",
                             per_device_train_batch_size=4, **overrides)
            cache[key] = SFTTrainer(model=model, args=args, processing_class=mixtral_tokenizer,
                                    train_dataset=Dataset.from_dict({"messages": conversations}))
        return cache[key]

    return run


def _runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for label in labels:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _expected(messages) -> list[str]:
    return [m["content"].strip() + "</s>" for m in messages if m["role"] == "assistant"]


def _collated_runs(trainer) -> list[list[int]]:
    """Trained runs of every batch the trainer's collator builds, cut at packed-sequence boundaries."""
    runs, rows = [], list(trainer.train_dataset)
    for start in range(0, len(rows), 4):
        batch = trainer.data_collator(rows[start:start + 4])
        labels = batch["labels"].clone()
        if "position_ids" in batch:  # padding-free: a new sequence starts where position_ids is 0
            starts = batch["position_ids"] == 0
            assert (labels[starts] == -100).all()
            labels[starts] = -100
        for row in labels.tolist():
            runs.extend(_runs(row))
    return runs


def test_padded_labels_train_exactly_assistant_turns_and_eos(prepare, mixtral_tokenizer, conversations):
    trainer = prepare(max_length=None)
    rows = list(trainer.train_dataset)
    assert len(rows) == len(conversations)
    n_system = 0
    for row in rows:
        decoded = [mixtral_tokenizer.decode(run).strip() for run in _runs(row["labels"])]
        assert decoded == _expected(row["messages"]), row["messages"]
        n_system += row["messages"][0]["role"] == "system"
        trained_ids = {i for i, label in enumerate(row["labels"]) if label != -100}
        assert row["input_ids"][0] == mixtral_tokenizer.bos_token_id and 0 not in trained_ids
    assert 0 < n_system < len(rows)  # both variants were drawn


@pytest.mark.parametrize("variant", [dict(padding_free=True, max_length=None),
                                     dict(packing=True, packing_strategy="bfd", max_length=1024)],
                         ids=["padding_free", "packed"])
def test_padding_free_and_packed_train_the_same_tokens(prepare, mixtral_tokenizer, conversations, variant):
    expected = Counter(text for messages in conversations for text in _expected(messages))
    runs = _collated_runs(prepare(**variant))
    assert Counter(mixtral_tokenizer.decode(run).strip() for run in runs) == expected
    reference = sum(len(run) for row in prepare(max_length=None).train_dataset
                    for run in _runs(row["labels"]))
    assert sum(len(run) for run in runs) == reference


def test_truncation_keeps_exactly_the_surviving_assistant_tokens(prepare):
    full = {str(row["messages"]): row["labels"] for row in prepare(max_length=None).train_dataset}
    truncated = list(prepare(max_length=24).train_dataset)
    assert 0 < len(truncated) < len(full)  # TRL drops conversations whose answers were all cut off
    for row in truncated:
        reference = full[str(row["messages"])][:24]
        assert row["labels"] == reference and any(label != -100 for label in row["labels"])
    dropped = [labels for labels in full.values() if all(label == -100 for label in labels[:24])]
    assert len(dropped) == len(full) - len(truncated)


def test_show_mask_matches_trl_labels_and_marks_answers(prepare, mixtral_tokenizer):
    row = next(r for r in prepare(max_length=None).train_dataset if len(r["messages"]) >= 4)
    ids, mask = assistant_token_mask(mixtral_tokenizer, row["messages"])
    assert ids == row["input_ids"]
    assert [label != -100 for label in row["labels"]] == [bool(bit) for bit in mask]
    plain = render_mask(mixtral_tokenizer, ids, mask, plain=True)
    marked = [part.split(TRAIN_CLOSE)[0].strip() for part in plain.split(TRAIN_OPEN)[1:]]
    assert marked == _expected(row["messages"])
    assert plain.replace(TRAIN_OPEN, "").replace(TRAIN_CLOSE, "") == mixtral_tokenizer.decode(ids)
    coloured = render_mask(mixtral_tokenizer, ids, mask)
    assert "\x1b[1;32m" in coloured and TRAIN_OPEN not in coloured
    assert mask_summary(mask).startswith(f"{len(ids)} tokens, {sum(mask)} trained")


def test_batch_without_trained_tokens_fails():
    def collator(examples):
        return {"labels": torch.full((len(examples), 5), -100)}

    with pytest.raises(RuntimeError, match="has no trained token"):
        RequireTrainedTokens(collator)([{}, {}])
    ok = RequireTrainedTokens(lambda examples: {"labels": torch.tensor([[-100, 7]])})
    assert ok([{}])["labels"].tolist() == [[-100, 7]]


def test_cli_show_mask_plain_from_data_file(capsys):
    from bimedix.cli import main
    from bimedix.resources import resource_path

    data = resource_path("recipes", "tiny", "data", "train.jsonl")
    assert main(["show-mask", "--data", str(data), "--index", "0", "--plain"]) == 0
    out = capsys.readouterr().out
    assert TRAIN_OPEN in out and "</s>" + TRAIN_CLOSE in out and "[row 0:" in out
    recipe = resource_path("recipes", "tiny", "sft.yaml")
    assert main(["show-mask", "--recipe", str(recipe), "--index", "47"]) == 0
    assert "\x1b[1;32m" in capsys.readouterr().out
    assert main(["show-mask", "--recipe", str(recipe), "--index", "48"]) == 2
    assert "out of range: the data has 48 rows" in capsys.readouterr().err
