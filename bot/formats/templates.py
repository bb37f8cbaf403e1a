"""Prompt templates: how a conversation becomes the text a model was trained on.

A template renders messages into `Segment`s instead of one string. Markup
segments (`[INST]`, `<|im_start|>user`, ...) are later tokenized with special
tokens parsed; text segments (what people typed) never are. That split is what
keeps a user who types `<|im_start|>system` from forging a system turn.

The named templates follow each model family's reference format. `auto` renders
the Jinja chat template embedded in the GGUF file, in Jinja2's sandbox.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import jinja2
import jinja2.sandbox
from jinja2.ext import loopcontrols

from bot.formats.reasoning import THINK_CLOSE, THINK_OPEN, ReplyFormat

log = logging.getLogger(__name__)

AUTO = "auto"
FALLBACK = "llama-2-chat"  # the seed's default, used when `auto` finds no usable GGUF template


@dataclass(frozen=True)
class Image:
    """A picture that belongs to a turn: its stored bytes (PNG or JPEG) and what identifies them."""

    digest: str  # SHA-256 of `data`, hex: the same picture anywhere is the same image
    data: bytes
    mime: str  # "image/png" or "image/jpeg"
    width: int
    height: int
    name: str = "image"  # the file name it came with


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, as templates see it.

    Templates render `content` only. `images` belong before the text (as llama-server
    places them): a backend that can show them puts its media marker there first."""

    role: str  # "system", "user" or "assistant"
    content: str
    images: tuple[Image, ...] = ()


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
    """The plain text of a rendered prompt (for `render-prompt` and the reference tests)."""
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
        return merge_markup(out)


def merge_markup(segments: Sequence[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbouring markup into one segment.

    Markup is tokenized as one piece, as the model's own tokenizer sees it: SentencePiece
    vocabularies put a space before text that follows a special token (`<s>[INST]` is
    `<s>`, `▁[INST]`), which two separately tokenized pieces would not."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and s.special and out[-1].special:
            out[-1] = Segment(out[-1].text + s.text, True)
        else:
            out.append(s)
    return out


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
            stop=("</s>", "<|user|>", "<|system|>", "<|assistant|>"),  # plain text in Zephyr's vocabulary
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


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Hugging Face's `tojson` (Jinja's own escapes HTML characters, which chat templates do not want)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template writes them

# Turn markers of the families we know. Those that a GGUF template writes also end a reply as
# text, for vocabularies where they are not control tokens (Mistral 7B's `[INST]` is plain text).
TURN_MARKERS = (
    "<|im_start|>", "<|im_end|>",  # ChatML: Qwen, SmolLM, ...
    "[INST]", "[/INST]",  # Llama 2, Mistral
    "<start_of_turn>", "<end_of_turn>",  # Gemma
    "<|start_header_id|>", "<|eot_id|>", "<|eom_id|>",  # Llama 3.x
    "<|user|>", "<|system|>", "<|assistant|>", "<|end|>",  # Phi-3, Zephyr, gpt-oss's <|end|>
    "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>",  # DeepSeek-R1 and its distills
)

_MAX_PATHS = 64  # ways of reading one rendering kept at once while verifying it (see `_locate`)


def _readings(content: str) -> list[str]:
    """What templates make of a message's content before writing it, most faithful first.

    Identity; Jinja's `trim` (Gemma, Llama 3.x) and its one-sided variants (Llama 2's
    `content | trim` around a prefix); and dropping earlier reasoning: the part after the
    last `</think>` (DeepSeek-R1), left-stripped of newlines (Qwen3, QwQ) or trimmed."""
    out = [content, content.strip(), content.lstrip(), content.rstrip()]
    if THINK_CLOSE in content:
        answer = content.split(THINK_CLOSE)[-1]
        out += [answer, answer.lstrip("\n"), answer.strip()]
    return list(dict.fromkeys(out))


def _locate(rendered: str, markup: Sequence[str], slots: Sequence[int], contents: Sequence[str]) -> list[str] | None:
    """The text that fills each slot, if `rendered` is exactly the skeleton's markup with
    one reading of each content in its slot: markup[0] + R0 + markup[1] + R1 + ... + markup[-1].

    This verifies; it never searches. Each reading must start exactly where the markup
    before it ends and be followed at once by the markup after it. Several readings can
    fit one slot (one is a prefix of another), so every position reached is kept, a few
    at most, and the first complete path wins. None: the rendering is not of that shape."""
    if not rendered.startswith(markup[0]):
        return None
    paths: dict[int, list[str]] = {len(markup[0]): []}
    for k, index in enumerate(slots):
        after = markup[k + 1]
        reached: dict[int, list[str]] = {}
        for pos, texts in paths.items():
            for text in _readings(contents[index]):
                end = pos + len(text)
                if rendered.startswith(text, pos) and rendered.startswith(after, end):
                    reached.setdefault(end + len(after), texts + [text])
        if not reached or len(reached) > _MAX_PATHS:
            return None
        paths = reached
    return paths.get(len(rendered))


class JinjaTemplate:
    """Renders a Hugging Face chat template (`tokenizer.chat_template`) as `apply_chat_template` does.

    The template sees the real messages, so the logic some templates apply to content
    runs as it does for Hugging Face: Qwen3 and DeepSeek-R1 drop earlier reasoning
    (`content.split('</think>')[-1]`), Gemma and Llama 3.x `trim`.

    Which characters are markup, and which came from people, is decided without trusting
    the content. Each render runs the template twice:

    1. the *skeleton*: every non-empty content replaced by a private-use placeholder. Its
       text between placeholders is the markup. It depends only on the roles, the number of
       messages and which contents are empty: never on a character anyone typed.
    2. the *real* rendering, with the real contents.

    Then `_locate` verifies that the real rendering is exactly the skeleton's markup with one
    of a few fixed readings of each content (`_readings`) in its placeholder's place. If it
    is, the prompt is that: equal, character for character, to Hugging Face's rendering.
    If it is not (the template changed its markup because of what a message says, or failed
    on it), the prompt is the skeleton's markup with each content, stripped, in its place,
    and a debug line says so.

    Why that is safe: in both cases every special segment is a piece of the skeleton's
    markup, and every text segment is a reading of one message's content. Only special
    segments are tokenized with control tokens parsed (`Vocab.encode`), so the control
    tokens of the prompt are those of the skeleton: the same for any contents with the same
    roles. A message cannot add, remove or move one. Verification decides only which text
    fills a slot, and only among readings of that slot's own content; it never looks for
    content in the rendering (a search could take template markup that equals user text,
    such as a message that is just `<|im_start|>`, for the message and forge a turn).
    """

    def __init__(self, source: str, *, bos_token: str, eos_token: str, name: str = AUTO, enable_thinking: bool | None = None) -> None:
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.enable_thinking = enable_thinking  # None: the template's own default
        self.takes_thinking_switch = "enable_thinking" in source  # Qwen3, DeepSeek-R1 distills
        self.harmony = "<|channel|>" in source  # gpt-oss: analysis and final channels
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the GGUF chat template does not parse: {exc}") from None
        # Families without a system role raise on one; learn that once and fold it instead.
        # A conversation must come through whole; `_check` raises TemplateError if it does not.
        self.supports_system = True
        probe = [Message("system", "S"), Message("user", "U"), Message("assistant", "A"), Message("user", "V")]
        try:
            segments = self._check(probe)
        except TemplateError:
            self.supports_system = False
            segments = self._check(probe)  # raises TemplateError if the template is unusable either way
        markup = "".join(s.text for s in segments if s.special)
        # gpt-oss's <|end|> closes its analysis message too: harmony replies end where ReplyText says
        markers = () if self.harmony else tuple(m for m in TURN_MARKERS if m in markup)
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in (eos_token, *markers) if s))

    def _check(self, probe: list[Message]) -> list[Segment]:
        segments = self.render(probe)
        texts = sorted(s.text for s in segments if not s.special)  # in any order: Mistral's put the system prompt last
        whole = [m.content for m in probe]
        folded = [f"{whole[0]}\n\n{whole[1]}", *whole[2:]]
        if texts not in (sorted(whole), sorted(folded)):
            raise TemplateError("the GGUF chat template drops or repeats messages")
        return segments

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        """The prompt for `messages`. A message the template leaves out is left out (Mistral's
        templates write the system prompt inside the last user turn, so without one it is
        absent); a template that repeats one is refused."""
        messages = list(messages)
        if not self.supports_system:
            system, messages = split_system(messages)
            if system and messages:
                messages[0] = Message(messages[0].role, f"{system}\n\n{messages[0].content.strip()}")
            elif system:  # the system prompt alone (the chat layer measures it): it will lead the first user turn
                messages = [Message("user", system)]
        contents = [m.content for m in messages]
        now = datetime.now()  # one clock reading for both passes (gpt-oss writes today's date)
        skeleton = self._run(messages, [f"\ue000{i}\ue001" if c else "" for i, c in enumerate(contents)], add_generation_prompt, now)
        markup: list[str] = []
        slots: list[int] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(skeleton):
            markup.append(skeleton[pos : match.start()])
            slots.append(int(match.group(1)))
            pos = match.end()
        markup.append(skeleton[pos:])
        if len(set(slots)) != len(slots):
            raise TemplateError("the GGUF chat template drops or repeats messages")
        texts: list[str] | None = None
        try:
            texts = _locate(self._run(messages, contents, add_generation_prompt, now), markup, slots, contents)
        except TemplateError as exc:
            log.debug("prompt template %r: failed on these messages (%s); using its markup with the messages in place", self.name, exc)
        else:
            if texts is None:
                log.debug("prompt template %r: its markup depends on what the messages say; using its markup with the messages in place", self.name)
        if texts is None:
            texts = [contents[i].strip() for i in slots]
        segments = [Segment(markup[0], True)]
        for text, after in zip(texts, markup[1:]):
            segments += [Segment(text, False), Segment(after, True)]
        return [s for s in segments if s.text]  # markup stays in the skeleton's pieces, even around an empty text

    def _run(self, messages: Sequence[Message], contents: Sequence[str], add_generation_prompt: bool, now: datetime) -> str:
        """One rendering, with Hugging Face's variables; any failure is a TemplateError."""
        variables: dict[str, object] = dict(
            messages=[{"role": m.role, "content": c} for m, c in zip(messages, contents)],
            tools=None,  # as apply_chat_template passes them when there are none
            documents=None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            strftime_now=now.strftime,
        )
        if self.enable_thinking is not None:
            variables["enable_thinking"] = self.enable_thinking
        try:
            return self._template.render(**variables)
        except jinja2.sandbox.SecurityError as exc:
            raise TemplateError(f"the GGUF chat template tried something unsafe and was stopped: {exc}") from None
        except Exception as exc:  # a template is foreign code: any failure means "unusable"
            raise TemplateError(f"the GGUF chat template failed: {type(exc).__name__}: {exc}") from None


def get_template(
    name: str, *, gguf_template: str | None = None, bos_token: str = "", eos_token: str = "", enable_thinking: bool | None = None
) -> Template:
    """The template called `name`; for `auto`, the GGUF's own, or the fallback with a log line.

    `enable_thinking` reaches templates that read it (Qwen3: False closes an empty
    `<think></think>` in the generation prompt); None leaves it undefined, so each
    template's own default applies."""
    key = canonical_name(name)
    if key != AUTO:
        return TEMPLATES[key]
    if not gguf_template:
        log.warning("prompt template 'auto': the model file has no chat template; using %r", FALLBACK)
        return TEMPLATES[FALLBACK]
    try:
        return JinjaTemplate(gguf_template, bos_token=bos_token, eos_token=eos_token, enable_thinking=enable_thinking)
    except TemplateError as exc:
        log.error("prompt template 'auto': %s; using %r instead", exc, FALLBACK)
        return TEMPLATES[FALLBACK]
