"""`ChatSession` and `bimedix chat`: prompts as in training (template, system prompt), opt-in language-following
system prompts, streaming, /reset, /exit; the notice is printed, not prompted."""

from __future__ import annotations

import builtins

import pytest
import torch

from bimedix.chat import NOTICE, SYSTEM_PROMPTS, ChatSession, detect_language, run_chat
from bimedix.cli import main
from bimedix.training.template import render


@pytest.fixture(scope="module")
def session(tiny_model_dir) -> ChatSession:
    return ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=6)


@pytest.mark.parametrize("text, expected", [
    ("What are the symptoms of anemia?", "en"),
    ("ما هي أعراض فقر الدم؟", "ar"),
    ("هل يمكن تناول ibuprofen مع الباراسيتامول؟", "ar"),  # Arabic with a drug name in Latin letters
    ("Is 5 mg of حبوب ok for my child's fever today?", "en"),
    ("١٢٣ ?", "en"),
])
def test_detect_language(text, expected):
    assert detect_language(text) == expected


def test_prompt_is_vicuna_without_a_system_prompt_by_default(session):
    session.reset()
    english = session.prompt("What is anemia?")
    assert english == render([{"role": "user", "content": "What is anemia?"}], add_generation_prompt=True)
    assert english == "<s>USER: What is anemia? ASSISTANT:" and "medical advice" not in english


def test_opt_in_system_prompts_follow_the_user_language(tiny_model_dir):
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", system=SYSTEM_PROMPTS, max_new_tokens=2)
    english = session.prompt("What is anemia?")
    assert english == render([{"role": "system", "content": SYSTEM_PROMPTS["en"]},
                              {"role": "user", "content": "What is anemia?"}], add_generation_prompt=True)
    assert "not medical advice" in english
    arabic = session.prompt("ما هو فقر الدم؟")
    assert arabic.startswith("<s>" + SYSTEM_PROMPTS["ar"]) and "أجب باللغة العربية" in arabic
    assert arabic.endswith("USER: ما هو فقر الدم؟ ASSISTANT:")


def test_adapter_training_settings_give_template_and_system_prompt(tiny_model_dir, tiny_adapter_dir, tmp_path):
    import shutil

    from bimedix.training.template import save_chat_settings, to_messages

    adapter = shutil.copytree(tiny_adapter_dir, tmp_path / "adapter")
    save_chat_settings(adapter, chat_template="vicuna", system_prompt="You answer medical questions.")
    session = ChatSession.from_pretrained(str(tiny_model_dir), peft=str(adapter), device="cpu", max_new_tokens=2)
    record = {"conversations": [{"from": "human", "value": "Hello"}]}
    assert session.prompt("Hello") == render(to_messages(record, system="You answer medical questions."),
                                             add_generation_prompt=True)
    explicit = ChatSession.from_pretrained(str(tiny_model_dir), peft=str(adapter), device="cpu", system=None)
    assert explicit.prompt("Hello") == "<s>USER: Hello ASSISTANT:"
    (adapter / "bimedix_chat.json").write_text('{"chat_template": "jinja"}')
    with pytest.raises(ValueError, match="bimedix_chat.json"):
        ChatSession.from_pretrained(str(tiny_model_dir), peft=str(adapter), device="cpu")


def test_streamed_reply_is_the_greedy_generation_and_joins_history(session):
    session.reset()
    pieces = list(session.stream("What is anemia?"))
    assert pieces and session.history[-1] == {"role": "assistant", "content": "".join(pieces).strip()}
    # Same as a plain greedy generate on the same prompt.
    session.history.clear()
    inputs = session.tokenizer(session.prompt("What is anemia?"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = session.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                     pad_token_id=session.tokenizer.pad_token_id)
    expected = session.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert "".join(pieces).strip() == expected


def test_multi_turn_history_switches_language_and_resets(session):
    session.reset()
    first = session.send("What is anemia?")
    prompt = session.prompt("وما علاجه؟")
    assert f"USER: What is anemia? ASSISTANT: {first}</s>USER: وما علاجه؟ ASSISTANT:" in prompt
    assert prompt.startswith("<s>USER: What is anemia?")
    session.send("وما علاجه؟")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.history == []


def test_custom_system_prompt_is_used_for_every_turn(tiny_model_dir):
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", system="Be brief.", max_new_tokens=2)
    assert session.prompt("ما هو فقر الدم؟").startswith("<s>Be brief. USER:")


def test_peft_adapter_is_applied(tiny_model_dir, tiny_adapter_dir):
    from peft import PeftModel

    session = ChatSession.from_pretrained(str(tiny_model_dir), peft=str(tiny_adapter_dir), device="cpu",
                                          max_new_tokens=3)
    assert isinstance(session.model, PeftModel)
    inputs = session.tokenizer(session.prompt("Hello"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        with_adapter = session.model(**inputs).logits
        with session.model.disable_adapter():
            without = session.model(**inputs).logits
    assert not torch.allclose(with_adapter, without)
    assert isinstance(session.send("Hello"), str)


def test_terminal_loop_handles_reset_and_exit(session):
    session.reset()
    inputs = iter(["Hello", "", "/reset", "مرحبا", "/exit", "never read"])
    prompts, out = [], []
    run_chat(session, read=lambda p: prompts.append(p) or next(inputs),
             write=lambda *a, end="\n", flush=False: out.append(" ".join(map(str, a)) + end))
    text = "".join(out)
    assert text.startswith(NOTICE) and "not medical advice" in NOTICE and "ليس استشارة طبية" in NOTICE
    assert "(conversation cleared)" in text and text.count("bimedix> ") == 2
    assert len(prompts) == 5  # stopped at /exit
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["مرحبا"]


def test_cli_chat(tiny_model_dir, monkeypatch, capsys):
    inputs = iter(["What is anemia?"])

    def fake_input(prompt):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "/reset" in out and "bimedix> " in out and NOTICE in out


@pytest.mark.parametrize("flags, system", [([], None), (["--system-prompt"], SYSTEM_PROMPTS),
                                           (["--system-prompt", "Be brief."], "Be brief."),
                                           (["--system", "Be brief."], "Be brief.")])
def test_cli_chat_system_prompt_is_opt_in(tiny_model_dir, monkeypatch, flags, system):
    import bimedix.chat

    sessions = []
    monkeypatch.setattr(bimedix.chat, "run_chat", sessions.append)
    assert main(["chat", "--model", str(tiny_model_dir), "--device", "cpu", *flags]) == 0
    assert sessions[0].system == system
