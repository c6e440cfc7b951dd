"""Bilingual chat with a BiMediX-style model: `ChatSession` for notebooks (`ChatSession.launch` for a web
page), `run_chat` for the terminal.

The model is prompted exactly as it was trained: `ChatSession.from_pretrained` reads the adapter's (or merged
model's) ``bimedix_chat.json`` (`bimedix.training.template.load_chat_settings`) for its chat template and
system prompt. The paper's recipe, like bimedix's, trains without a system prompt, so by default none is
sent. A folder without that file is chatted with through its tokenizer's own template, else the Vicuna
template (`bimedix.training.template.VICUNA_TEMPLATE`), and no system prompt.

The not-medical-advice notice (`NOTICE`) is shown to the user by the interface (`run_chat` prints it), not
put in the model's prompt. ``system=`` replaces the system prompt: a string for every turn, or
`SYSTEM_PROMPTS` (short prompts that tell the model it is not a doctor) to pick one per user turn in that
turn's language (`detect_language`).

Examples:

```python
>>> from bimedix.chat import ChatSession
>>> chat = ChatSession.from_pretrained("runs/quickstart/base-model",  # doctest: +SKIP
...                                    peft="runs/quickstart/adapter")
>>> for piece in chat.stream("ما هي أعراض فقر الدم؟"):  # doctest: +SKIP
...     print(piece, end="", flush=True)
>>> chat.reset()  # doctest: +SKIP

```
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping

from .deprecations import quiet_peft_checkpointing_warning
from .resources import check_model_folder
from .training.template import VICUNA_TEMPLATE, load_chat_settings

logger = logging.getLogger(__name__)

#: Opt-in system prompts per language (``bimedix chat --system-prompt``); none is sent by default.
# The Arabic prompt and notice were written by the bimedix developers; no professional translator reviewed
# them.
SYSTEM_PROMPTS = {
    "en": ("You are BiMediX, a bilingual medical assistant. Answer in English, clearly and briefly, and ask "
           "for details when you need them. You are not a doctor and this is not medical advice: for "
           "diagnosis, treatment or emergencies, the user must see a qualified health professional."),
    "ar": ("أنت BiMediX، مساعد طبي ثنائي اللغة. أجب باللغة العربية بوضوح وإيجاز، واطلب التفاصيل عند الحاجة. "
           "أنت لست طبيبًا وهذه ليست استشارة طبية: للتشخيص أو "
           "العلاج أو في الحالات الطارئة يجب مراجعة مختص صحي مؤهل."),
}
DISCLAIMER = ("Research model, not medical advice: it can be wrong. See a health professional for real "
              "concerns.\nنموذج بحثي، وليس استشارة طبية: قد يخطئ. راجع مختصًا صحيًا لأي مشكلة حقيقية.")
NOTICE = DISCLAIMER + "\nType /reset to start over, /exit to quit."
_NOT_UTF8 = "(that line is not valid UTF-8 text and was skipped; set your terminal to UTF-8)"
_ARABIC = re.compile(r"[\u0600-\u06FF\u0750-\u077F\u08A0-\u08FF\uFB50-\uFDFF\uFE70-\uFEFF]")
_LATIN = re.compile(r"[A-Za-z]")


def detect_language(text: str) -> str:
    """Return ``"ar"`` when ``text`` has at least as many Arabic letters as Latin ones (and some), else
    ``"en"``."""
    arabic = sum(char.isalpha() for char in _ARABIC.findall(text))  # letters only, not Arabic-Indic digits
    return "ar" if arabic and arabic >= len(_LATIN.findall(text)) else "en"


class ChatSession:
    """A multi-turn, streaming chat over a causal LM (optionally with a PEFT adapter).

    Args:
        model (`PreTrainedModel`): the model (a `peft.PeftModel` works too).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        system (`str | Mapping[str, str]`, *optional*): one system prompt for every turn, or one per language
            (e.g. `SYSTEM_PROMPTS`) picked by the language of each user turn; none by default, as in training.
        max_new_tokens (`int`, *optional*, defaults to `256`): reply length limit.
        temperature (`float`, *optional*, defaults to `0.0`): ``0`` decodes greedily; above it samples.
        top_p (`float`, *optional*, defaults to `0.9`): nucleus sampling mass when sampling.
        context_length (`int`, *optional*): tokens the model can attend to (prompt + reply); defaults to the
            model config's ``max_position_embeddings``. The oldest exchanges are dropped from the history
            when a prompt would not fit (`trimmed_turns` counts them).
        chat_template (`str`, *optional*): the Jinja chat template; defaults to the tokenizer's own, else
            `VICUNA_TEMPLATE`.
    """

    def __init__(self, model, tokenizer, *, system: str | Mapping[str, str] | None = None,
                 max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 0.9, context_length: int | None = None,
                 chat_template: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system = system
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or VICUNA_TEMPLATE
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        self.history: list[dict[str, str]] = []
        self.trimmed_turns = 0

    @classmethod
    def from_pretrained(cls, model: str, peft: str | None = None, *, device: str | None = None,
                        use_kernels: bool = False, **kwargs) -> ChatSession:
        """Load ``model`` (a folder or Hub id), optionally with the PEFT adapter ``peft``, on ``device``.

        The tokenizer comes from the adapter folder when it has one, else from the model. The chat template
        and system prompt come from the training run's ``bimedix_chat.json`` in the adapter folder (or,
        without an adapter, the model folder) unless ``chat_template=`` or ``system=`` is passed. Hub kernels
        are used only with ``use_kernels=True`` (`bimedix.hub_kernels`). Other keyword arguments go to
        `ChatSession`.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .hub_kernels import load_pretrained

        check_model_folder(model)
        if peft:
            check_model_folder(peft, "--peft")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base = load_pretrained(AutoModelForCausalLM, model, use_kernels=use_kernels, dtype="auto").to(device)
        tokenizer_source = model
        if peft:
            from peft import PeftModel

            with quiet_peft_checkpointing_warning():
                base = PeftModel.from_pretrained(base, peft).to(device)
            try:
                tokenizer = AutoTokenizer.from_pretrained(peft)
                tokenizer_source = peft
            except OSError:
                tokenizer = AutoTokenizer.from_pretrained(model)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model)
        settings = load_chat_settings(peft or model) if os.path.isdir(peft or model) else None
        if settings is not None:
            kwargs.setdefault("system", settings["system_prompt"])
            if settings["chat_template"] == "vicuna":
                kwargs.setdefault("chat_template", VICUNA_TEMPLATE)
        logger.info("chat model %s%s, tokenizer from %s, on %s; training settings: %s", model,
                    f" + adapter {peft}" if peft else "", tokenizer_source, device,
                    settings if settings is not None
                    else "none recorded (tokenizer template, no system prompt)")
        return cls(base, tokenizer, **kwargs)

    def messages(self, text: str) -> list[dict[str, str]]:
        """The chat messages a reply to ``text`` is generated from: system prompt, history, then ``text``."""
        system = self.system[detect_language(text)] if isinstance(self.system, Mapping) else self.system
        head = [{"role": "system", "content": system}] if system else []
        return [*head, *self.history, {"role": "user", "content": text}]

    def prompt(self, text: str) -> str:
        """The exact prompt string (chat template, generation prompt included) sent for ``text``."""
        return self.tokenizer.apply_chat_template(self.messages(text), chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def stream(self, text: str) -> Iterator[str]:
        """Generate the reply to ``text`` piece by piece; the full exchange joins the history at the end.

        Closing the iterator early (or an exception such as Ctrl-C while it waits) stops the generation
        and leaves the history as it was. Raises `ValueError` when ``text`` alone does not fit the context.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        inputs = self.tokenizer(self.fit_history(text), return_tensors="pt",
                                add_special_tokens=False).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} \
            if self.temperature > 0 else {"do_sample": False}
        stop = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        kwargs = dict(**inputs, streamer=streamer, max_new_tokens=self.max_new_tokens,
                      pad_token_id=self.tokenizer.eos_token_id if self.tokenizer.pad_token_id is None
                      else self.tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList([_Stop()]),
                      **sampling)
        errors: list[BaseException] = []

        def generate() -> None:
            try:
                self.model.generate(**kwargs)
            except BaseException as err:  # handed to the caller's thread below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=generate, name="bimedix-chat-generate", daemon=True)
        thread.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                yield piece
        finally:
            stop.set()  # a no-op after a finished reply; otherwise generation ends at the next token
            _join(thread)
        if errors:
            raise errors[0]
        self.history += [{"role": "user", "content": text}, {"role": "assistant",
                                                             "content": "".join(pieces).strip()}]

    def fit_history(self, text: str) -> str:
        """Drop the oldest exchanges until the prompt for ``text`` plus a full reply fits the context; return
        it.

        Sets `trimmed_turns` to the number of exchanges dropped (0 when all fit). The system prompt is
        never dropped. The fewest exchanges to drop are found by bisection: about log2(exchanges) prompts are
        rendered and tokenized, not one per dropped exchange (`benchmarks/chat_history.py`).

        Raises:
            `ValueError`: ``text`` does not fit even with no history (the history is then left as it was).
        """
        self.trimmed_turns = 0
        prompt = self.prompt(text)
        if self.context_length is None or self._fits(prompt):
            return prompt
        kept = list(self.history)

        def dropping(count: int) -> str:
            self.history[:] = kept[2 * count:]
            return self.prompt(text)

        low, high = 0, (len(kept) + 1) // 2  # dropping `low` exchanges does not fit; dropping `high` must
        prompt = dropping(high)
        if not self._fits(prompt):
            self.history[:] = kept
            raise ValueError(f"the message does not fit the model's context of {self.context_length} "
                             f"tokens (with {self.max_new_tokens} kept for the reply); shorten it")
        while high - low > 1:
            middle = (low + high) // 2
            candidate = dropping(middle)
            if self._fits(candidate):
                high, prompt = middle, candidate
            else:
                low = middle
        self.history[:] = kept[2 * high:]
        self.trimmed_turns = high
        return prompt

    def _fits(self, prompt: str) -> bool:
        """Whether ``prompt`` plus a reply of `max_new_tokens` fits the context."""
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + self.max_new_tokens \
            <= self.context_length

    def send(self, text: str) -> str:
        """Generate the whole reply to ``text`` and return it."""
        return "".join(self.stream(text)).strip()

    def reply_to(self, messages: list[dict[str, str]]) -> str:
        """The whole reply to a given conversation (ending with a user turn), leaving `history` alone.

        Used by ``bimedix eval-chat``: the same template, system prompt (unless ``messages`` has one),
        decoding settings and length limit as a chat turn. Raises `ValueError` when the conversation does not
        fit.
        """
        if not any(m["role"] == "system" for m in messages):
            last = messages[-1]["content"]
            system = self.system[detect_language(last)] if isinstance(self.system, Mapping) else self.system
            messages = [{"role": "system", "content": system}, *messages] if system else list(messages)
        prompt = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                    add_generation_prompt=True, tokenize=False)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        length = inputs["input_ids"].shape[1]
        if self.context_length is not None and length + self.max_new_tokens > self.context_length:
            raise ValueError(f"the conversation ({length} tokens) plus a {self.max_new_tokens}-token reply "
                             f"does not fit the model's context of {self.context_length} tokens")
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} \
            if self.temperature > 0 else {"do_sample": False}
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                     **sampling)
        return self.tokenizer.decode(output[0, length:], skip_special_tokens=True).strip()

    def reset(self) -> None:
        """Forget the conversation."""
        self.history.clear()

    def launch(self, host: str = "127.0.0.1", port: int = 7860, *, block: bool = False,
               token: str | None = None):
        """Serve this chat as a web page (needs ``pip install 'bimedix[web]'``); returns the running server.

        Args:
            host (`str`, *optional*, defaults to `"127.0.0.1"`): address to listen on (this machine only by
                default; any other needs ``token``).
            port (`int`, *optional*, defaults to `7860`): port.
            block (`bool`, *optional*, defaults to `False`): serve in this thread until Ctrl-C (the CLI)
                instead of a background thread (notebooks; stop it with ``server.close()``).
            token (`str`, *optional*): shared secret: the page is then opened as ``/?token=...``.
        """
        from .web.server import WebServer, require_web

        require_web()
        from .web.chat_app import create_chat_app

        app = create_chat_app(self, notice=DISCLAIMER, language_of=detect_language, token=token, host=host)
        server = WebServer(app, host, port)
        print(f"BiMediX chat page on {server.url}{'?token=...' if token else ''}"
              + (" (Ctrl-C to stop)" if block else ""), flush=True)
        if block:
            server.run()
        return server if block else server.start()


def run_chat(session: ChatSession, *, read: Callable[[str], str] | None = None,
             write: Callable[..., None] | None = None) -> None:
    """Terminal loop: prints the notice, streams replies, handles ``/reset`` and ``/exit`` (and
    Ctrl-D/Ctrl-C).

    Ctrl-C at any point of a turn (before the reply starts too) stops it and returns to the prompt; Ctrl-C or
    Ctrl-D at the prompt ends the chat.
    Lines that are not valid UTF-8 are reported and skipped; when the history no longer fits the model's
    context the oldest exchanges are dropped, with a notice.

    Args:
        session (`ChatSession`): the conversation.
        read (`Callable`, *optional*, defaults to `input`): returns the next user line given a prompt.
        write (`Callable`, *optional*, defaults to `print`): prints (accepts ``end`` and ``flush``).
    """
    read, write = read or input, write or print
    write(NOTICE)
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write()
            return
        except UnicodeDecodeError:  # a reader that decodes strictly
            write(_NOT_UTF8)
            continue
        if not text:
            continue
        if not _is_utf8(text):
            write(_NOT_UTF8)
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            write("(conversation cleared)")
            continue
        reply = session.stream(text)
        try:
            _reply(session, reply, write)
        except ValueError as err:  # the message alone is longer than the context
            write(f"({err})")
        except KeyboardInterrupt:  # at any point of the turn: before generation starts too
            try:
                reply.close()
            except KeyboardInterrupt:  # pressed again while stopping: the generation has ended (`_join`)
                pass
            write("\n(reply stopped; it is not kept in the conversation)")


def _reply(session: ChatSession, reply: Iterator[str], write: Callable[..., None]) -> None:
    """Print one streamed reply (after the context notice, when exchanges were dropped)."""
    first = next(reply, None)
    if session.trimmed_turns:
        write(f"(the {session.trimmed_turns} oldest exchange(s) were dropped to fit the model's context "
              f"of {session.context_length} tokens)")
    write("bimedix> ", end="", flush=True)
    for piece in itertools.chain([first] if first is not None else [], reply):
        write(piece, end="", flush=True)
    write()


def _join(thread: threading.Thread) -> None:
    """Join ``thread`` even through Ctrl-C (it ends at the next token), then re-raise the interrupt: a new
    turn never starts while the last one still generates."""
    interrupted = False
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _is_utf8(text: str) -> bool:
    """False for text holding undecodable bytes (lone surrogates from ``errors="surrogateescape"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
