"""Prompt templates: how a conversation becomes the text a model was trained on.

A template renders messages into `Segment`s instead of one string. Markup
segments (`[INST]`, `<|im_start|>user`, ...) are later tokenized with special
tokens parsed; text segments (what people typed) never are. That split is what
keeps a user who types `<|im_start|>system` from forging a system turn.

The named templates follow each model family's reference format. `auto` renders
the Jinja chat template embedded in the GGUF file, in Jinja2's sandbox.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import jinja2
import jinja2.sandbox
from jinja2.ext import loopcontrols

from bot.reasoning import THINK_OPEN, ReplyFormat

log = logging.getLogger(__name__)

AUTO = "auto"
FALLBACK = "llama-2-chat"  # the seed's default, used when `auto` finds no usable GGUF template


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, as templates see it."""

    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered prompt. `special` is True for template markup only."""

    text: str
    special: bool


class Template(Protocol):
    """What every prompt template offers."""

    name: str
    stop: tuple[str, ...]  # strings that end a reply (and never appear in it)
    harmony: bool  # replies use gpt-oss's channels (analysis, then final)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]: ...


def prompt_text(segments: Sequence[Segment]) -> str:
    """The plain text of a rendered prompt (for `render-prompt` and golden tests)."""
    return "".join(s.text for s in segments)


def reply_format(template: Template, segments: Sequence[Segment]) -> ReplyFormat:
    """How the reply to this rendered prompt will be laid out.

    A prompt whose markup ends by opening `<think>` (DeepSeek-R1's generation
    prompt does) makes the reply start inside the model's reasoning."""
    last = next((s for s in reversed(segments) if s.text.strip()), None)
    opened = last is not None and last.special and last.text.rstrip().endswith(THINK_OPEN)
    return ReplyFormat(stop=template.stop, harmony=template.harmony, thinking=opened)


@dataclass(frozen=True)
class TurnTemplate:
    """A format where each role's turn is wrapped in a fixed prefix and suffix.

    `system` wraps a separate system turn; families without a system role use
    `fold_system` instead, which wraps the system text inside the first user turn.
    """

    name: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # appended to ask the model for the next assistant turn
    stop: tuple[str, ...]
    begin: str = ""
    system: tuple[str, str] | None = None
    fold_system: tuple[str, str] = ("", "\n\n")
    harmony: bool = False

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        out: list[Segment] = [Segment(self.begin, True)]
        system, turns = split_system(messages)
        if system and self.system is not None:
            out += _wrap(self.system, system)
            system = ""
        for message in turns:
            if message.role == "user":
                out.append(Segment(self.user[0], True))
                if system:  # no system role: fold it into the first user turn
                    out += _wrap(self.fold_system, system)
                    system = ""
                out += [Segment(message.content.strip(), False), Segment(self.user[1], True)]
            elif message.role == "assistant":
                out += _wrap(self.assistant, message.content.strip())
            else:
                raise ValueError(f"unknown role {message.role!r}")
        if add_generation_prompt:
            out.append(Segment(self.generation, True))
        return [s for s in out if s.text]


def _wrap(affixes: tuple[str, str], content: str) -> list[Segment]:
    return [Segment(affixes[0], True), Segment(content.strip(), False), Segment(affixes[1], True)]


def split_system(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """Separate a leading system message from the turns that follow it."""
    if messages and messages[0].role == "system":
        return messages[0].content.strip(), list(messages[1:])
    return "", list(messages)


_LLAMA2 = dict(
    begin="",
    user=("<s>[INST] ", " [/INST]"),
    assistant=(" ", " </s>"),
    generation="",
    fold_system=("<<SYS>>\n", "\n<</SYS>>\n\n"),
    stop=("</s>", "[INST]", "[/INST]"),
)

TEMPLATES: dict[str, TurnTemplate] = {
    t.name: t
    for t in [
        # Meta's llama-2 chat format (llama/generation.py): system folded into the first [INST].
        TurnTemplate(name="llama-2-chat", **_LLAMA2),  # type: ignore[arg-type]
        # Code Llama Instruct uses the same format as Llama 2 chat (codellama/generation.py).
        TurnTemplate(name="codellama-instruct", **_LLAMA2),  # type: ignore[arg-type]
        # Mistral 7B Instruct v0.1: no system role, so the system text leads the first [INST].
        TurnTemplate(
            name="mistral-instruct",
            begin="<s>",
            user=("[INST] ", " [/INST]"),
            assistant=(" ", "</s>"),
            generation="",
            stop=("</s>", "[INST]", "[/INST]"),
        ),
        # BELLE-Llama2 chat: "Human: \n{question}\n\nAssistant: \n{answer}".
        TurnTemplate(
            name="belle-llama-2-chat",
            user=("Human: \n", "\n\n"),
            assistant=("Assistant: \n", "</s>"),
            generation="Assistant: \n",
            stop=("</s>", "Human:"),
        ),
        # FastChat vicuna_v1.1: "{system} USER: {u} ASSISTANT: {a}</s>USER: ...".
        TurnTemplate(
            name="vicuna-chat",
            system=("", " "),
            user=("USER: ", " "),
            assistant=("ASSISTANT: ", "</s>"),
            generation="ASSISTANT:",
            stop=("</s>", "USER:"),
        ),
        TurnTemplate(
            name="chatml",
            system=("<|im_start|>system\n", "<|im_end|>\n"),
            user=("<|im_start|>user\n", "<|im_end|>\n"),
            assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
            generation="<|im_start|>assistant\n",
            stop=("<|im_end|>", "<|im_start|>"),
        ),
        # Gemma: no system role; Google folds it into the first user turn.
        TurnTemplate(
            name="gemma-instruct",
            begin="<bos>",
            user=("<start_of_turn>user\n", "<end_of_turn>\n"),
            assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
            generation="<start_of_turn>model\n",
            stop=("<end_of_turn>", "<start_of_turn>"),
        ),
        TurnTemplate(
            name="llama-3-chat",
            begin="<|begin_of_text|>",
            system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
            user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
            assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
            generation="<|start_header_id|>assistant<|end_header_id|>\n\n",
            stop=("<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"),
        ),
        TurnTemplate(
            name="zephyr",
            system=("<|system|>\n", "</s>\n"),
            user=("<|user|>\n", "</s>\n"),
            assistant=("<|assistant|>\n", "</s>\n"),
            generation="<|assistant|>\n",
            stop=("</s>", "<|user|>", "<|system|>"),
        ),
        TurnTemplate(
            name="phi-3-chat",
            system=("<|system|>\n", "<|end|>\n"),
            user=("<|user|>\n", "<|end|>\n"),
            assistant=("<|assistant|>\n", "<|end|>\n"),
            generation="<|assistant|>\n",
            stop=("<|end|>", "<|user|>", "<|endoftext|>"),
        ),
    ]
}
ALIASES = {"mistral-instruct-v0.1": "mistral-instruct"}
NAMES: tuple[str, ...] = (AUTO, *TEMPLATES)


def canonical_name(name: str) -> str:
    """Resolve aliases; an unknown name is a KeyError whose message lists the valid ones."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key == AUTO or key in TEMPLATES:
        return key
    raise KeyError(f"unknown prompt template {name!r}; valid: {', '.join(NAMES)} (alias: mistral-instruct-v0.1)")


# --- auto: the chat template embedded in the GGUF ------------------------------------------


class TemplateError(Exception):
    """The GGUF's embedded template cannot be used (unsafe, broken, or drops messages)."""


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja2's sandbox, made to fail loudly on unsafe access instead of rendering ''.

    A template that reaches for Python internals (`''.__class__.__mro__`) is not
    a template we want to half-run.
    """

    def unsafe_undefined(self, obj: object, attribute: str) -> jinja2.Undefined:
        raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


class JinjaTemplate:
    """Renders a Hugging Face style chat template (`tokenizer.chat_template`).

    Each message's content is replaced by a private-use placeholder while the
    template runs; the rendered text is then split at the placeholders so that
    everything the template wrote is markup and everything people wrote is text.
    """

    def __init__(self, source: str, *, bos_token: str, eos_token: str, name: str = AUTO) -> None:
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.stop: tuple[str, ...] = tuple(s for s in (eos_token,) if s)
        self.harmony = "<|channel|>" in source  # gpt-oss: analysis and final channels
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the GGUF chat template does not parse: {exc}") from None
        # Families without a system role raise on one; learn that once and fold it instead.
        self.supports_system = True
        probe = [Message("system", "S"), Message("user", "U"), Message("assistant", "A"), Message("user", "V")]
        try:
            self.render(probe)
        except TemplateError:
            self.supports_system = False
            self.render(probe)  # raises TemplateError if the template is unusable either way

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        messages = list(messages)
        if not self.supports_system:
            system, messages = split_system(messages)
            if system and messages:
                messages[0] = Message(messages[0].role, f"{system}\n\n{messages[0].content.strip()}")
        contents = [m.content.strip() for m in messages]
        try:
            rendered = self._template.render(
                messages=[{"role": m.role, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.sandbox.SecurityError as exc:
            raise TemplateError(f"the GGUF chat template tried something unsafe and was stopped: {exc}") from None
        except Exception as exc:  # a template is foreign code: any failure means "unusable"
            raise TemplateError(f"the GGUF chat template failed: {type(exc).__name__}: {exc}") from None
        segments: list[Segment] = []
        seen: list[int] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(rendered):
            index = int(match.group(1))
            segments += [Segment(rendered[pos : match.start()], True), Segment(contents[index], False)]
            seen.append(index)
            pos = match.end()
        segments.append(Segment(rendered[pos:], True))
        if sorted(seen) != list(range(len(messages))):
            raise TemplateError("the GGUF chat template drops or repeats messages")
        return [s for s in segments if s.text]


def get_template(name: str, *, gguf_template: str | None = None, bos_token: str = "", eos_token: str = "") -> Template:
    """The template called `name`; for `auto`, the GGUF's own, or the fallback with a log line."""
    key = canonical_name(name)
    if key != AUTO:
        return TEMPLATES[key]
    if not gguf_template:
        log.warning("prompt template 'auto': the model file has no chat template; using %r", FALLBACK)
        return TEMPLATES[FALLBACK]
    try:
        return JinjaTemplate(gguf_template, bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        log.error("prompt template 'auto': %s; using %r instead", exc, FALLBACK)
        return TEMPLATES[FALLBACK]
