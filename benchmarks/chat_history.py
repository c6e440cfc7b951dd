"""Time `ChatSession.fit_history` (issue 20, item 6): prints measured figures, asserts nothing.

``chat --web`` fits the history the page sends into the model's context while it holds the one model lock,
so its cost is paid by every waiting user. This builds a tiny random Mixtral with the real 32,000-piece
Mixtral tokenizer and the Vicuna template, fills the history with ``N`` exchanges of about ``--words`` words
each (far more than the ``--context`` tokens hold, so most must be dropped) and times one ``fit_history``:
the seconds, the exchanges dropped, and how many prompts were rendered and tokenized.

Usage::

    python benchmarks/chat_history.py --exchanges 100 200 400 800
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--words", type=int, default=40, help="words per message (default 40)")
    parser.add_argument("--context", type=int, default=4096, help="context length in tokens (default 4096)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens kept for the reply")
    args = parser.parse_args(argv)

    from bimedix.chat import ChatSession
    from bimedix.training.tiny import save_tiny_model

    folder = save_tiny_model(tempfile.mkdtemp(prefix="bimedix-chat-history-"))
    session = ChatSession.from_pretrained(str(folder), device="cpu", context_length=args.context,
                                          max_new_tokens=args.max_new_tokens)
    prompt, renders = session.prompt, []
    session.prompt = lambda text: renders.append(1) or prompt(text)
    words = ("anaemia iron ferritin haemoglobin fatigue pallor diet rest test result dose week "
             "فقر الدم الحديد التعب الشحوب").split()
    print(f"{'exchanges':>9} {'turns':>6} {'dropped':>7} {'renders':>7} {'seconds':>8}")
    for count in args.exchanges:
        session.history = [{"role": role, "content": f"{role} {i}: "
                            + " ".join(words[(i + j) % len(words)] for j in range(args.words))}
                           for i in range(count) for role in ("user", "assistant")]
        renders.clear()
        start = time.perf_counter()
        session.fit_history("What should I eat?")
        seconds = time.perf_counter() - start
        print(f"{count:>9} {2 * count:>6} {session.trimmed_turns:>7} {len(renders):>7} {seconds:>8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
