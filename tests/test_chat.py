"""`ChatSession` and `bimedix chat`: prompts as in training (template, system prompt), opt-in
language-following system prompts, streaming, /reset, /exit; the notice is printed, not prompted."""

from __future__ import annotations

import builtins
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch
from process_support import WatchedProcess

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
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", system=SYSTEM_PROMPTS,
                                          max_new_tokens=2)
    english = session.prompt("What is anemia?")
    assert english == render([{"role": "system", "content": SYSTEM_PROMPTS["en"]},
                              {"role": "user", "content": "What is anemia?"}], add_generation_prompt=True)
    assert "not medical advice" in english
    arabic = session.prompt("ما هو فقر الدم؟")
    assert arabic.startswith("<s>" + SYSTEM_PROMPTS["ar"]) and "أجب باللغة العربية" in arabic
    assert arabic.endswith("USER: ما هو فقر الدم؟ ASSISTANT:")


def test_adapter_training_settings_give_template_and_system_prompt(tiny_model_dir, tiny_adapter_dir,
                                                                   tmp_path):
    import shutil

    from bimedix.training.template import save_chat_settings, to_messages

    adapter = shutil.copytree(tiny_adapter_dir, tmp_path / "adapter")
    save_chat_settings(adapter, chat_template="vicuna", system_prompt="You answer medical questions.")
    session = ChatSession.from_pretrained(str(tiny_model_dir), peft=str(adapter), device="cpu",
                                          max_new_tokens=2)
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
    inputs = session.tokenizer(session.prompt("What is anemia?"), return_tensors="pt",
                               add_special_tokens=False)
    with torch.no_grad():
        ids = session.model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                     pad_token_id=session.tokenizer.pad_token_id)
    expected = session.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:],
                                        skip_special_tokens=True).strip()
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
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", system="Be brief.",
                                          max_new_tokens=2)
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


def test_history_is_trimmed_to_the_context_keeping_the_system_prompt(tiny_model_dir):
    session = ChatSession.from_pretrained(str(tiny_model_dir), device="cpu", max_new_tokens=4,
                                          system=SYSTEM_PROMPTS)
    session.send("What is anemia?")
    session.send("And how is it treated?")
    tokens = len(session.tokenizer(session.prompt("Thanks."), add_special_tokens=False)["input_ids"])
    session.context_length = tokens + 4 - 1  # one token short: the oldest exchange must go
    out = []
    inputs = iter(["Thanks.", "/exit"])
    run_chat(session, read=lambda p: next(inputs),
             write=lambda *a, end="\n", flush=False: out.append(" ".join(map(str, a)) + end))
    assert session.trimmed_turns == 1
    assert "(the 1 oldest exchange(s) were dropped to fit the model's context" in "".join(out)
    assert [m["content"] for m in session.history if m["role"]
            == "user"] == ["And how is it treated?", "Thanks."]
    assert session.prompt("x").startswith("<s>" + SYSTEM_PROMPTS["en"])
    session.context_length = 8  # not even the system prompt and the message fit: reported, nothing sent
    history = list(session.history)
    out.clear()
    inputs = iter(["A long question about anemia and iron", "/exit"])
    run_chat(session, read=lambda p: next(inputs),
             write=lambda *a, end="\n", flush=False: out.append(" ".join(map(str, a)) + end))
    assert "does not fit the model's context of 8 tokens" in "".join(out)
    assert session.history == history  # the conversation so far is kept


def test_undecodable_line_is_reported_and_skipped(session):
    session.reset()
    inputs = iter([b"\xff\xfe caf\xe9".decode("utf-8", "surrogateescape"), b"\xe9", "Hello", "/exit"])

    def read(prompt):  # the second line comes from a reader that decodes strictly
        line = next(inputs)
        return line.decode("utf-8") if isinstance(line, bytes) else line

    out = []
    run_chat(session, read=read, write=lambda *a, end="\n",
             flush=False: out.append(" ".join(map(str, a)) + end))
    assert "".join(out).count("not valid UTF-8 text and was skipped") == 2
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Hello"]


def test_closing_a_reply_early_stops_generation_and_keeps_history(session):
    session.reset()
    session.max_new_tokens = 2000
    try:
        reply = session.stream("What is anemia?")
        next(reply)
        reply.close()
    finally:
        session.max_new_tokens = 6
    assert session.history == []
    assert not [thread for thread in threading.enumerate() if thread.name == "bimedix-chat-generate"]


def test_ctrl_c_in_the_terminal_chat_stops_the_reply_and_returns_to_the_prompt(tiny_model_dir):
    """A real SIGINT once the reply has started streaming, then a non-UTF-8 line, then /exit: no traceback,
    exit 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bimedix", "chat", "--model", str(tiny_model_dir), "--device", "cpu",
               "--max-new-tokens", "3000"]
    with WatchedProcess(command, stdin=subprocess.PIPE, env=env) as chat:
        chat.write(b"What is anemia?\n")
        chat.wait_for_output(re.compile(r"bimedix> \S"))  # printed with the first piece of the reply
        chat.send_signal(signal.SIGINT)
        result = chat.finish(b"\xff\xfe caf\xe9\n/exit\n")
    assert result.returncode == 0, chat.output()
    assert "Traceback" not in result.stderr
    assert "(reply stopped; it is not kept in the conversation)" in result.stdout
    assert "not valid UTF-8 text and was skipped" in result.stdout


@pytest.mark.parametrize("moment", ["fit_history", "bimedix> ", "piece"])
def test_ctrl_c_at_any_point_of_a_turn_returns_to_the_prompt(session, monkeypatch, moment):
    """Ctrl-C before generation starts (fitting the history), as the reply's label prints, or while a piece
    prints: the turn ends with one notice, the history is unchanged, and the chat goes on to /exit."""
    session.reset()
    if moment == "fit_history":
        monkeypatch.setattr(session, "fit_history", lambda text: (_ for _ in ()).throw(KeyboardInterrupt))
    lines = iter(["What is anemia?", "/exit"])
    out, interrupts = [], []

    def write(*args, **kwargs):
        text = "".join(map(str, args))
        if not interrupts and (moment == text or (moment == "piece" and out and out[-1] == "bimedix> ")):
            interrupts.append(text)
            raise KeyboardInterrupt
        out.append(text)

    run_chat(session, read=lambda prompt: next(lines), write=write)
    assert len(interrupts) == (moment != "fit_history")
    assert out[-1] == "\n(reply stopped; it is not kept in the conversation)"
    assert session.history == []
    assert not [thread for thread in threading.enumerate() if thread.name == "bimedix-chat-generate"]


@pytest.mark.parametrize("flags, system", [([], None), (["--system-prompt"], SYSTEM_PROMPTS),
                                           (["--system-prompt", "Be brief."], "Be brief."),
                                           (["--system", "Be brief."], "Be brief.")])
def test_cli_chat_system_prompt_is_opt_in(tiny_model_dir, monkeypatch, flags, system):
    import bimedix.chat

    sessions = []
    monkeypatch.setattr(bimedix.chat, "run_chat", sessions.append)
    assert main(["chat", "--model", str(tiny_model_dir), "--device", "cpu", *flags]) == 0
    assert sessions[0].system == system


def test_reply_to_a_whole_conversation_is_the_chat_reply_and_keeps_history(session):
    session.reset()
    expected = session.send("What is anemia?")
    follow_up = session.send("And in children?")
    kept = list(session.history)
    conversation = [{"role": "user", "content": "What is anemia?"},
                    {"role": "assistant", "content": expected},
                    {"role": "user", "content": "And in children?"}]
    assert session.reply_to(conversation[:1]) == expected
    assert session.reply_to(conversation) == follow_up
    assert session.history == kept
    with pytest.raises(ValueError, match="does not fit the model's context"):
        session.reply_to([{"role": "user", "content": "word " * (session.context_length or 10 ** 6)}])
