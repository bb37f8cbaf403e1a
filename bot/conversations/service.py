"""Conversations: from a user's message to a stored reply.

`ChatService` ties the store, the templates and the model backend together,
and is what both the terminal chat and the Discord adapter call. It knows
nothing of Discord (a conversation is a scope string, messages are plain text)
and nothing of what runs the model beyond the `Backend` interface.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bot.engine.backend import Backend, EngineStats, Generation, Models, ModelStatus, ModelUnavailable, PreparedPrompt
from bot.config import TEMPERATURE_RANGE, THINKING_MODES, TOP_P_RANGE, ConfigError, Sampling, Settings
from bot.formats.reasoning import HARMONY_END, THINK_CLOSE, THINK_OPEN
from bot.conversations import images as pictures
from bot.conversations.images import ImageInput, Refused
from bot.conversations.lock import serving
from bot.conversations.records import VISIBLE, ChatMode, Conversation, MessageStatus, PendingTurn, StoredImage, StoredMessage
from bot.conversations.store import Store
from bot.formats.templates import AUTO, Image, JinjaTemplate, Message, Segment, Template, TemplateError, canonical_name, get_template

if TYPE_CHECKING:
    from bot.engine.local import EngineOptions
    from bot.engine.pool import ModelPool

log = logging.getLogger(__name__)

WINDOW_REFILL = 0.5  # after the history outgrows the context, the prompt restarts half full (as llama.cpp's context shift)
IMAGE_ROOM = 0.25  # when images must give way, enough of them do to leave this share of the window free for the next turns
UPCOMING_TOKENS = 128  # room a warm-up keeps for the message being typed, so its window slides as the real prompt's will
CUT_NOTE = "(Your message was too long for my context window, so I only read its beginning.)"
CUT_FILES_NOTE = "(Your message with its attached files was too long for my context window, so I only read its beginning: about {kept:.0%} of it.)"
EMPTY_NOTE = "(I had nothing to say to that. Try rephrasing?)"
NOT_NEWEST = "Only the newest answer here can be regenerated or continued."
NO_ANSWER = "That answer is no longer stored, so I cannot write it again."
TOO_LONG_TO_CONTINUE = "This answer is too long to continue: it no longer fits in my context window."
NO_CONTINUE = "Continuing an answer needs OPENAI_MODE=completions with this model server."
IMAGE_PLACEHOLDER = "[image]"  # what the model reads where an image was that it is not shown (no room, or it cannot see)
PLACEHOLDER_TOKENS = 4  # what a placeholder costs in the window, about
IMAGES_CUT_NOTE = "(Your images did not fit in my context window with your message, so I only know that they were there.)"
IMAGE_CACHE_BYTES = 64 << 20  # image bytes kept in RAM between prompts (SQLite holds them all)
MODEL_GONE_NOTE = "(The model {gone} is no longer offered here, so this channel is back on the default model, {default}.)"
BLIND_MODEL_NOTE = "(This channel's model, {model}, cannot see images, so it only knows that yours were there; /model can switch to one that can.)"


@dataclass(frozen=True)
class UserMessage:
    """A message someone sent, as the platform adapter hands it over."""

    scope: str
    content: str
    author_id: str | None = None
    author_name: str | None = None
    platform_message_id: str | None = None
    channel_id: str | None = None  # where it was said (to catch up on a channel after a restart)


class TemplateChoiceError(ValueError):
    """A template switch that cannot be done; the message says why, for the user."""


class SettingError(ValueError):
    """A /system or /settings value that is refused; the message says why and what is allowed."""


class ModelChoiceError(ValueError):
    """A /model switch that cannot be done; the message says why, for the user."""


@dataclass(frozen=True)
class ChannelOptions:
    """How a conversation's replies are made: its own settings over the configured defaults."""

    sampling: Sampling
    n_predict: int
    thinking: str
    own: frozenset[str]  # which of temperature, top_p, n_predict, thinking the channel set itself


@dataclass(frozen=True)
class Place:
    """A conversation, where it happens on its platform, and the newest platform message stored for it."""

    scope: str
    channel_id: str | None
    newest_message_id: int | None


@dataclass(frozen=True)
class LastReply:
    """The newest reply started in a conversation, for /status: no tokenizing needed to show it."""

    prompt_tokens: int  # tokens of its prompt (the conversation's window in use)
    budget: int  # most prompt tokens the window may hold (n_ctx - n_predict)
    generation: Generation  # n_cached, n_evaluated, timings and n_generated, filled in as it runs
    model: str | None = None  # the catalogue model that wrote it (None: the only model, no catalogue)


class CannotRedo(ValueError):
    """A Regenerate or Continue that cannot be done; the message says why, for the user."""


@dataclass(frozen=True)
class Prompt:
    prepared: PreparedPrompt
    messages: list[Message]
    template: Template
    n_history: int  # stored messages that made it into the prompt
    cut: bool  # the newest message had to be shortened
    kept: float = 1.0  # the share of its characters that was kept, when cut
    images_cut: bool = False  # the newest message's own images did not fit (placeholders instead)
    n_images: int = 0  # images shown to the model in this prompt
    backend: Backend | None = None  # the model it was built for (its tokens are that model's)
    model: str | None = None  # ... by its catalogue name


def shows_names(authors: set[str | None]) -> bool:
    """When several people talk in a conversation, the prompt says who said what."""
    return len(authors) > 1


@dataclass
class Reply:
    """A reply in progress. Stream it, then `save()` it once it was delivered (or not)."""

    chat: ChatService
    conversation: Conversation
    generation: Generation
    prompt: Prompt
    user_message_id: int
    saved_id: int | None = None
    notes: list[str] = field(default_factory=list)
    discarded: bool = False  # the user took their message back: nothing is stored
    thinking: str = "hide"  # how the reasoning of a reasoning model is shown (the channel's THINKING mode)
    rewrites: StoredMessage | None = None  # Regenerate / Continue: the stored answer this reply replaces
    prefix: str = ""  # Continue: the answer so far, which the generation extends

    async def text(self) -> str:
        """The final text to show: the reply, or a short note when there is none."""
        await self.generation.wait()
        return self.clean_text() or EMPTY_NOTE

    def clean_text(self) -> str:
        """The answer as it stands (for Continue: the earlier part and what was added)."""
        return (self.prefix + self.generation.text).strip()

    def reasoning_text(self) -> str:
        """The model's private reasoning, if it wrote any (never shown in `hide` mode, never in prompts)."""
        return self.generation.reasoning.strip()

    @property
    def finish_reason(self) -> str | None:
        return self.generation.finish_reason

    def stop(self) -> None:
        """/stop: end the reply now, keeping what was written."""
        self.generation.cancel()

    def discard(self) -> None:
        """The user deleted their message: stop now and store nothing for this turn."""
        self.discarded = True
        self.generation.cancel()

    async def save(self, *, delivered: bool = True, platform_message_id: str | None = None, last_message_id: str | None = None) -> int | None:
        """Store the finished reply with its turn, in one transaction. An undelivered one is
        kept but never shown to the model; a failed or empty one stores only the turn.

        A Regenerate or Continue replaces the answer it rewrites, in its place in the history.
        `last_message_id`: the last platform message, when the reply took several."""
        await self.generation.wait()
        if self.discarded:
            return None
        text = self.clean_text()
        failed = self.generation.finish_reason == "error" or not text
        status = MessageStatus.UNDELIVERED if not delivered else MessageStatus.STOPPED if self.generation.finish_reason == "cancelled" else MessageStatus.OK
        if self.rewrites is not None:
            if failed:
                return None  # failed, or stopped before it wrote anything: the earlier answer stays as it was
            earlier = (self.rewrites.token_count or 0) if self.prefix else 0
            self.saved_id = await self.chat.store.replace_answer(
                self.rewrites.id,
                text,
                reasoning=self.reasoning_text() or (self.rewrites.reasoning if self.prefix else None),
                platform_message_id=platform_message_id,
                last_message_id=last_message_id,
                token_count=earlier + self.generation.n_generated,
                status=status,
            )
            return self.saved_id
        self.saved_id = await self.chat.store.finish_turn(
            self.user_message_id,
            None if failed else text,
            reasoning=self.reasoning_text() or None,
            platform_message_id=platform_message_id,
            last_message_id=last_message_id,
            token_count=self.generation.n_generated,
            status=status,
        )
        return self.saved_id


class ChatService:
    """Builds prompts from stored history and starts generations on the backend."""

    def __init__(self, backend: Backend, store: Store, settings: Settings, models: Models | None = None) -> None:
        self.backend = backend  # the default model's (with `models`, that of models.default)
        self.models = models  # several models, chosen per conversation (/model); None: just `backend`
        self.store = store
        self.settings = settings
        self._templates: dict[tuple[str | None, str], Template] = {}  # (model, template name) -> template
        self._model_notes: dict[str, list[str]] = {}  # scope -> notes for its next reply (its model left the catalogue)
        self._window_start: dict[str, int] = {}  # scope -> id of the oldest message in its last prompt
        self._images_from: dict[str, int] = {}  # scope -> messages older than this id show placeholders, not images
        self._image_bytes: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # sha256 -> stored bytes (LRU)
        self._image_cache_used = 0
        self._forgets: collections.Counter[str] = collections.Counter()  # scope -> times its cached state was dropped
        self.last_replies: collections.OrderedDict[str, LastReply] = collections.OrderedDict()  # newest 1,000 scopes
        self.last_reply: LastReply | None = None  # bot-wide
        self._chat_modes: dict[str, ChatMode] = {}  # conversations not in ChatMode.OFF (see load_chat_modes)
        if settings.n_predict >= backend.n_ctx:
            raise ConfigError(f"LLAMA_N_PREDICT ({settings.n_predict}) must be less than the context size LLAMA_N_CTX ({backend.n_ctx})")

    # --- templates ---------------------------------------------------------------------

    def template(self, name: str, backend: Backend | None = None) -> Template:
        """A template by name, `auto` resolved against the model of `backend` (default: the
        default model's), cached per model: each model's `auto` is its own GGUF's template."""
        backend = backend or self.backend
        key = canonical_name(name)
        cache_key = (str(backend.info.path), key)  # (a named template takes the model's BOS and EOS too)
        if cache_key not in self._templates:
            info = backend.info
            self._templates[cache_key] = get_template(
                key, gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token, enable_thinking=self.settings.enable_thinking
            )
        return self._templates[cache_key]

    def template_name(self, conversation: Conversation) -> str:
        return conversation.template or self.settings.prompt_template

    def describe_template(self, conversation: Conversation) -> str:
        backend = self.backend_now(conversation)
        if backend.applies_template:
            return "the server's own (this bot sends whole conversations to the server, which applies its chat template)"
        name = self.template_name(conversation)
        resolved = self.template(name, backend)
        if name == AUTO and resolved.name != AUTO:
            return f"auto (the model has no usable chat template, so {resolved.name})"
        if isinstance(resolved, JinjaTemplate) and resolved.takes_thinking_switch:
            switch = {None: "the template's default", True: "on", False: "off"}[self.settings.enable_thinking]
            return f"{name} (thinking: {switch}, ENABLE_THINKING)"
        return name

    async def set_template(self, scope: str, name: str) -> str:
        """Switch a conversation's template; its cached KV no longer matches."""
        if self.backend.applies_template:
            raise TemplateChoiceError("The model server applies its own chat template here, so /template has no effect.")
        try:
            key = canonical_name(name)
        except KeyError as exc:
            raise TemplateChoiceError(exc.args[0]) from None
        await self.store.set_template(scope, key)
        self.forget(scope)
        return key

    # --- models (/model) ----------------------------------------------------------------

    def model_name(self, conversation: Conversation) -> str | None:
        """The catalogue name of the model answering a conversation (None: no catalogue)."""
        if self.models is None:
            return None
        if conversation.model is None:
            return self.models.default
        return conversation.model if conversation.model in self.models.names() or not self.models.complete else self.models.default

    async def refresh_models(self) -> None:
        """Read the list of models again where it can change (a model server's /v1/models)."""
        if self.models is not None:
            await self.models.refresh()

    def backend_now(self, conversation: Conversation) -> Backend:
        """The conversation's model if it is loaded now, else the default's (for descriptions and
        estimates that must not load a model)."""
        if self.models is None or conversation.model is None:
            return self.backend
        return self.models.loaded(conversation.model) or self.backend

    def model_names(self) -> list[str]:
        """Every model a conversation may choose, the default first (empty: no catalogue)."""
        return self.models.names() if self.models is not None else []

    def model_status(self) -> list[ModelStatus]:
        """Each catalogue model, loaded or not, with what it costs (for /model and /status)."""
        return self.models.status() if self.models is not None else []

    async def set_model(self, scope: str, name: str | None) -> str:
        """Switch a conversation's model (None: back to the default). Its history stays; a
        conversation on the `auto` template follows the new model's own. The states cached for
        the old model stay where they are (RAM, disk), for when it comes back."""
        if self.models is not None and name is not None and name not in self.models.names():
            await self.models.refresh()  # a server may serve it since we last asked
        if self.models is None or len(self.models.names()) < 2:
            raise ModelChoiceError("Only one model is offered here (set MODELS or MODELS_DIR to offer more).")
        if name is not None and name not in self.models.names():
            raise ModelChoiceError(f"There is no model named {name!r}. Available: {', '.join(self.models.names())}.")
        stored = None if name == self.models.default else name
        await self.store.set_model(scope, stored)
        self._window_start.pop(scope, None)  # another context size: the window is laid out anew
        self._images_from.pop(scope, None)
        return name or self.models.default

    async def model_to_load(self, scope: str) -> str | None:
        """The model a reply in this conversation would have to load first (None: it is ready),
        so the front end can say "loading model X" while it does."""
        if self.models is None:
            return None
        conversation = await self.store.find_conversation(scope)
        if conversation is None or conversation.model is None or conversation.model not in self.models.names():
            return None
        return None if self.models.loaded(conversation.model) is not None else conversation.model

    async def follow_channel(self, scope: str, channel_scope: str) -> None:
        """A conversation the bot starts from a channel's (a thread for a mention) takes what
        an admin chose for that channel: its template, system prompt, settings and model,
        each where the new conversation has none of its own (after a restart the thread may
        have chosen its own since)."""
        parent = await self.store.find_conversation(channel_scope)
        if parent is None:
            return
        own = await self.store.conversation(scope)
        if own.template is None and parent.template is not None:
            await self.store.set_template(scope, parent.template)
        if own.system_prompt is None and parent.system_prompt is not None:
            await self.store.set_system_prompt(scope, parent.system_prompt)
        settings = ("temperature", "top_p", "n_predict", "thinking")
        if all(getattr(own, s) is None for s in settings) and any(getattr(parent, s) is not None for s in settings):
            await self.store.set_channel_settings(
                scope, temperature=parent.temperature, top_p=parent.top_p, n_predict=parent.n_predict, thinking=parent.thinking
            )
        if self.models is not None and own.model is None and parent.model is not None:
            await self.store.set_model(scope, parent.model)

    @contextlib.asynccontextmanager
    async def _using(self, conversation: Conversation) -> AsyncIterator[tuple[Backend, str | None]]:
        """The conversation's model, loaded if need be and kept loaded while the block starts a
        reply on it. A model no longer in the catalogue sends the conversation back to the
        default, with a note on its next reply. Raises ModelUnavailable."""
        if self.models is None:
            yield self.backend, None
            return
        name = conversation.model
        if name is not None and name not in self.models.names() and self.models.complete:
            log.warning("the model %r of %s left the catalogue: back to the default model", name, conversation.scope)
            await self.store.set_model(conversation.scope, None)
            self._model_notes.setdefault(conversation.scope, []).append(MODEL_GONE_NOTE.format(gone=name, default=self.models.default))
            self._window_start.pop(conversation.scope, None)
            name = None
        async with self.models.hold(name or self.models.default) as backend:
            yield backend, name or self.models.default

    # --- per-conversation settings -------------------------------------------------------

    def system_prompt(self, conversation: Conversation) -> str:
        return conversation.system_prompt if conversation.system_prompt is not None else self.settings.system_prompt

    async def set_system_prompt(self, scope: str, text: str | None) -> None:
        """A conversation's own system prompt (None: back to SYSTEM_PROMPT). The prompt starts
        with it, so the conversation's cached KV state no longer matches and is dropped.

        Raises SettingError when it would leave too little of the window for the conversation."""
        if text is not None:
            text = text.strip()
            if not text:
                raise SettingError("The system prompt cannot be empty. Use `reset` to go back to the default one.")
            conversation = await self.store.conversation(scope)
            backend = self.backend_now(conversation)
            budget = backend.n_ctx - self.options(conversation).n_predict
            [tokens] = await backend.count([text])
            if tokens > budget // 2:
                raise SettingError(f"That system prompt is about {tokens} tokens; here it may be at most {budget // 2} (half of the context window).")
        await self.store.set_system_prompt(scope, text)
        self.forget(scope)

    def options(self, conversation: Conversation) -> ChannelOptions:
        """The conversation's settings over the configured ones. A stored reply length above
        today's LLAMA_N_PREDICT (lowered since) is held to it."""
        s = self.settings
        sampling = replace(
            s.sampling,
            temperature=conversation.temperature if conversation.temperature is not None else s.sampling.temperature,
            top_p=conversation.top_p if conversation.top_p is not None else s.sampling.top_p,
        )
        own = {k for k in ("temperature", "top_p", "n_predict", "thinking") if getattr(conversation, k) is not None}
        return ChannelOptions(
            sampling=sampling,
            n_predict=min(conversation.n_predict, s.n_predict) if conversation.n_predict is not None else s.n_predict,
            thinking=conversation.thinking or s.thinking,
            own=frozenset(own),
        )

    async def change_options(
        self,
        scope: str,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        n_predict: int | None = None,
        thinking: str | None = None,
        reset: bool = False,
    ) -> ChannelOptions:
        """Change some of a conversation's settings (None: leave as is; `reset`: all back to the
        defaults first). Every value is checked before anything is stored: SettingError says
        what is allowed."""
        self.check_options(temperature=temperature, top_p=top_p, n_predict=n_predict, thinking=thinking)
        current = await self.store.conversation(scope)
        if reset:
            current = replace(current, temperature=None, top_p=None, n_predict=None, thinking=None)

        def pick(new: object, old: object) -> object:
            return new if new is not None else old

        updated = await self.store.set_channel_settings(
            scope,
            temperature=pick(temperature, current.temperature),  # type: ignore[arg-type]
            top_p=pick(top_p, current.top_p),  # type: ignore[arg-type]
            n_predict=pick(n_predict, current.n_predict),  # type: ignore[arg-type]
            thinking=pick(thinking, current.thinking),  # type: ignore[arg-type]
        )
        return self.options(updated)

    def check_options(
        self, *, temperature: float | None = None, top_p: float | None = None, n_predict: int | None = None, thinking: str | None = None
    ) -> None:
        """Raise SettingError, saying the allowed range, for a value a conversation may not use."""
        if temperature is not None and not TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]:
            raise SettingError(f"temperature must be from {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g} (0 always picks the likeliest word), not {temperature:g}.")
        if top_p is not None and not TOP_P_RANGE[0] <= top_p <= TOP_P_RANGE[1]:
            raise SettingError(f"top_p must be from {TOP_P_RANGE[0]:g} to {TOP_P_RANGE[1]:g}, not {top_p:g}.")
        if n_predict is not None and not 1 <= n_predict <= self.settings.n_predict:
            raise SettingError(f"reply length must be from 1 to {self.settings.n_predict} tokens (LLAMA_N_PREDICT), not {n_predict}.")
        if thinking is not None and thinking not in THINKING_MODES:
            raise SettingError(f"thinking must be one of {', '.join(THINKING_MODES)}, not {thinking!r}.")

    # --- what the front ends read and record ----------------------------------------------

    async def conversation(self, scope: str) -> Conversation:
        """A conversation's record (its template, system prompt and settings), created on first use."""
        return await self.store.conversation(scope)

    async def load_chat_modes(self) -> None:
        """Read every conversation's chat mode once, at start: `chat_mode` is asked for every message."""
        self._chat_modes = await self.store.chat_modes()

    def chat_mode(self, scope: str) -> ChatMode:
        """Which messages of a conversation are answered (no database read: see `load_chat_modes`)."""
        return self._chat_modes.get(scope, ChatMode.OFF)

    async def set_chat_mode(self, scope: str, mode: ChatMode) -> None:
        await self.store.set_chat_mode(scope, mode)
        if mode == ChatMode.OFF:
            self._chat_modes.pop(scope, None)
        else:
            self._chat_modes[scope] = mode

    async def waiting(self) -> list[PendingTurn]:
        """Messages still waiting for an answer (left by an earlier run), oldest first."""
        return await self.store.pending()

    async def expire(self, message_id: int) -> None:
        """A waiting message that will never be answered (too old, or its author may no longer ask)."""
        await self.store.set_status(message_id, MessageStatus.EXPIRED)

    async def places(self) -> list[Place]:
        """Every conversation with where it happens and the newest platform message stored for it,
        to read what was said there while the bot was away."""
        return [
            Place(c.scope, c.channel_id, await self.store.newest_platform_id(c.id)) for c in await self.store.conversations()
        ]

    async def connected_until(self, platform: str) -> float | None:
        """Until when (unix time) a front end was last known connected to its platform, so that a
        restart reads only what was said since; None on a first start."""
        value = await self.store.state(f"{platform}.connected_until")
        return float(value) if value is not None else None

    async def note_connected(self, platform: str, until: float) -> None:
        await self.store.set_state(f"{platform}.connected_until", repr(until))

    async def has_seen(self, platform_message_id: str) -> bool:
        """Whether a platform message is stored (it is answered once, however often it is seen)."""
        return await self.store.has_platform_id(platform_message_id)

    async def message(self, message_id: int) -> StoredMessage | None:
        """A stored message as it stands now (an edit may have changed it since it arrived)."""
        return await self.store.message(message_id)

    async def add_files(self, message_id: int, files: str | None) -> None:
        """Add a stored message's attached files, rendered for the prompt, once they are read
        (the message is stored before they are, so a restart during the download cannot lose it)."""
        await self.store.set_attachments(message_id, files)

    async def note_reply_message(self, message_id: int, platform_message_id: str | None) -> None:
        """Remember the platform message that shows (or will show) a waiting message's reply, so
        a restart finishes that message instead of posting another."""
        await self.store.set_reply_message(message_id, platform_message_id)

    async def newest_answer_message(self, scope: str) -> str | None:
        """The last platform message of the conversation's newest stored answer (where its buttons are)."""
        conversation = await self.store.conversation(scope)
        turn = await self.store.last_turn(conversation.id)
        answer = turn[1] if turn is not None else None
        return (answer.reply_message_id or answer.platform_message_id) if answer is not None else None

    async def history(self, scope: str) -> tuple[Conversation, list[StoredMessage]]:
        """A conversation and all its messages, oldest first (/export)."""
        conversation = await self.store.conversation(scope)
        return conversation, await self.store.messages(conversation.id)

    async def reset(self, scope: str) -> int:
        """Forget a conversation's history (settings stay). Returns how many messages went."""
        removed = await self.store.clear(scope)
        self.forget(scope)
        return removed

    async def edit_message(self, platform_message_id: str, content: str, *, image_names: Sequence[str] | None = None) -> str | None:
        """Follow an edit made on the platform; returns the conversation's scope if it was stored.

        A message still waiting for its turn is simply answered in its new form; one
        already in the history makes the cached prompt of its conversation stale.
        `image_names`: the file names of the images the message still has (an edit can
        remove attachments); the others are deleted. None: its images stay as they are."""
        found = await self.store.edit_by_platform_id(platform_message_id, content)
        if found is None:
            return None
        scope, visible = found
        if image_names is not None:
            await self.store.keep_images(platform_message_id, image_names)
        if visible:
            self.forget(scope)
        return scope

    async def delete_message(self, platform_message_id: str) -> str | None:
        """Follow a delete made on the platform; returns the conversation's scope if it was stored."""
        found = await self.store.delete_by_platform_id(platform_message_id)
        if found is None:
            return None
        scope, visible = found
        if visible:
            self.forget(scope)
        return scope

    # --- images ----------------------------------------------------------------------

    @property
    def can_see(self) -> bool:
        """Whether images sent now reach the model (see `cannot_see` for why not)."""
        return self.cannot_see() is None

    def cannot_see(self) -> str | None:
        """Why images do not reach the model, in a few words (None: they do)."""
        if not self.settings.image_max_kb:
            return "image input is turned off here (IMAGE_MAX_KB=0)"
        if self.models is not None and self.models.sees_images():
            return None  # some model can see them (one that cannot reads a placeholder in its place)
        return self.backend.image_support()

    def image_note(self) -> str | None:
        """The short note for a message whose images the model cannot see (None: it can)."""
        why = self.cannot_see()
        return f"I can't see images: {why}." if why else None

    def image_refusal(self, filename: str, declared_bytes: int) -> str | None:
        """The note for an image refused before it is downloaded (its declared size is over
        IMAGE_MAX_KB), None when it should be downloaded and given to `add_images`."""
        return pictures.too_big(filename, declared_bytes, self.settings.image_max_kb)

    async def add_images(self, message_id: int, images: Sequence[ImageInput]) -> list[str]:
        """Store images with a stored message (received as pending before they downloaded).

        Each is checked, converted if needed and scaled down to IMAGE_MAX_PIXELS off the
        event loop. Returns short notes for the reply: images refused (too big, unreadable)
        and, when the model cannot see, one note saying so (nothing is stored then)."""
        if not images:
            return []
        note = self.image_note()
        if note:
            return [note]
        s = self.settings

        def prepare_all() -> tuple[list[tuple[StoredImage, bytes]], list[str]]:
            taken, notes = [], []
            for item in images:
                try:
                    taken.append(pictures.prepare(item, max_kb=s.image_max_kb, max_pixels=s.image_max_pixels))
                except Refused as exc:
                    notes.append(str(exc))
            return taken, notes

        taken, notes = await asyncio.to_thread(prepare_all)
        if taken and await self.store.add_images(message_id, taken):
            stored = await self.store.message(message_id)
            if stored is not None and stored.status in VISIBLE:  # added to a turn already in the history
                conversation = next((c for c in await self.store.conversations() if c.id == stored.conversation_id), None)
                if conversation is not None:
                    self.forget(conversation.scope)
        return notes

    async def _image(self, image: StoredImage) -> Image | None:
        """A stored image with its bytes, for a prompt (None: deleted meanwhile)."""
        data = self._image_bytes.get(image.sha256)
        if data is None:
            data = await self.store.image_data(image.sha256)
            if data is None:
                return None
            self._image_bytes[image.sha256] = data
            self._image_cache_used += len(data)
            while self._image_cache_used > IMAGE_CACHE_BYTES and len(self._image_bytes) > 1:
                _, old = self._image_bytes.popitem(last=False)
                self._image_cache_used -= len(old)
        else:
            self._image_bytes.move_to_end(image.sha256)
        return Image(image.sha256, data, image.mime, image.width, image.height, image.name)

    async def _image_costs(self, page: Sequence[StoredMessage], backend: Backend) -> dict[int, int]:
        """Tokens the images of each message of `page` take in a prompt (by message id)."""
        described = [(m.id, Image(i.sha256, b"", i.mime, i.width, i.height, i.name)) for m in page for i in m.images]
        if not described:
            return {}
        counts = await backend.count_images([image for _, image in described])
        costs: dict[int, int] = {}
        for (message_id, _), n in zip(described, counts):
            costs[message_id] = costs.get(message_id, 0) + n
        return costs

    async def _message(self, stored: StoredMessage, names: bool, show_images: bool) -> Message:
        """A stored message as the template gets it: its images (where shown) go with it, the
        others become placeholders in its text."""
        content = _content(stored, names)
        images: list[Image] = []
        if show_images:
            for image in stored.images:
                found = await self._image(image)
                if found is not None:
                    images.append(found)
        missing = len(stored.images) - len(images)
        if missing:
            content = " ".join([IMAGE_PLACEHOLDER] * missing + ([content] if content else []))
        return Message(stored.role, content, tuple(images))

    @property
    def can_continue(self) -> bool:
        """Continue needs the prompt rendered here, to leave the answer's turn open: a
        server that applies its own chat template may start a new turn instead."""
        return not self.backend.applies_template

    def backend_dead(self) -> bool:
        """True once a model engine gave up (the process is about to exit and restart)."""
        if self.models is not None:
            return any(b is not None and b.dead is not None for b in map(self.models.loaded, self.models.names()))
        return self.backend.dead is not None

    def on_backend_fatal(self, callback: Callable[[str], None]) -> None:
        """Call `callback(why)` (from any thread) if a model engine gives up for good."""
        self.backend.on_fatal = callback
        if self.models is not None:
            self.models.on_fatal = callback  # the models loaded later too

    def forget(self, scope: str) -> None:
        """The stored history changed under a conversation: drop its cached KV and window."""
        self._window_start.pop(scope, None)
        self._images_from.pop(scope, None)
        self._forgets[scope] += 1
        if self.models is not None:
            self.models.forget(scope)  # every model's state of it, in memory and on disk
        else:
            self.backend.forget(scope)

    async def warm(self, scope: str, *, author_id: str | None = None) -> bool:
        """A member of this conversation started typing: have the backend make the
        conversation's state ready for the message to come, so its reply only reads that
        message. Cheap to call on every typing event (the Discord adapter's TYPING_START).

        The prompt warmed is the one the next message will extend: the system prompt and the
        history up to its last turn, windowed as `build_prompt` will window it (with room for
        the message), rendered without a generation prompt. `author_id`: who is typing (in a
        guild channel where someone else spoke so far, their message turns names on).

        True if a warm-up is on its way; False when WARM_ON_TYPING is off, the backend cannot
        warm (a remote server), the conversation has no history yet, or a reply of it is
        already running."""
        if not self.settings.warm_on_typing or not self.backend.can_warm:
            return False
        last = self.last_replies.get(scope)
        if last is not None and not last.generation.done:
            return False  # its state will be in its slot when that reply ends
        try:
            conversation = await self.store.find_conversation(scope)
            if conversation is None:
                return False
            backend = self.backend
            if self.models is not None:
                ready = self.models.loaded(self.model_name(conversation) or self.models.default)
                if ready is None:
                    return False  # typing never loads a model: the message will
                backend = ready
            forgets = self._forgets[scope]
            prompt = await self.build_prompt(conversation, upcoming=author_id or "", backend=backend)
            if prompt.n_history == 0 or self._forgets[scope] != forgets:  # nothing to warm, or the history changed meanwhile (/reset, an edit)
                return False
            return backend.warm(scope, prompt.prepared)
        except Exception:  # speculative work: a failure here must not reach the caller's event handler
            log.exception("could not warm up %s", scope)
            return False

    # --- replying ----------------------------------------------------------------------

    async def receive(self, message: UserMessage) -> int | None:
        """Store a message to be answered, as pending, the moment it arrives (before it
        waits its turn), so a restart cannot lose it. None: it was stored already."""
        conversation = await self.store.conversation(message.scope, channel_id=message.channel_id)
        return await self.store.receive(
            conversation.id,
            message.content,
            author_id=message.author_id,
            author_name=message.author_name,
            platform_message_id=message.platform_message_id,
        )

    async def answer(self, scope: str, message_id: int) -> Reply | None:
        """Start answering a stored pending message, in its latest form.

        None when it is no longer waiting (deleted, or answered already)."""
        stored = await self.store.message(message_id)
        if stored is None or stored.status != MessageStatus.PENDING:
            return None
        conversation = await self.store.conversation(scope)
        options = self.options(conversation)
        async with self._using(conversation) as (backend, model):
            prompt = await self.build_prompt(conversation, include=message_id, backend=backend, model=model)
            log.debug("prompt for %s: %d tokens, %d history messages%s", scope, prompt.prepared.n_tokens, prompt.n_history, " (cut)" if prompt.cut else "")
            return self._start(conversation, prompt, options, stored)

    def _start(self, conversation: Conversation, prompt: Prompt, options: ChannelOptions, user: StoredMessage, sampling: Sampling | None = None, **rewrite: Any) -> Reply:
        """Start generating from a built prompt (answer, Regenerate, Continue), remember it for
        /status, and tell the user when their message had to be cut to fit."""
        scope = conversation.scope
        backend = prompt.backend or self.backend
        generation = backend.generate(scope, prompt.prepared, max_tokens=options.n_predict, sampling=sampling or options.sampling)
        self._remember(scope, LastReply(prompt.prepared.n_tokens, backend.n_ctx - options.n_predict, generation, prompt.model))
        # The reply's notes are the generation's: a note the backend adds while it runs (a server
        # that refused the images) shows with the reply too.
        reply = Reply(self, conversation, generation, prompt, user.id, thinking=options.thinking, notes=generation.notes, **rewrite)
        reply.notes.extend(self._model_notes.pop(scope, []))
        if prompt.cut:
            reply.notes.append(CUT_FILES_NOTE.format(kept=prompt.kept) if user.attachments else CUT_NOTE)
        if prompt.images_cut:
            reply.notes.append(IMAGES_CUT_NOTE)
        if user.images and backend.image_support() is not None:  # stored for another model of the catalogue that can see
            reply.notes.append(BLIND_MODEL_NOTE.format(model=prompt.model or "the default"))
        return reply

    def _remember(self, scope: str, last: LastReply) -> None:
        self.last_reply = last
        self.last_replies[scope] = last
        self.last_replies.move_to_end(scope)
        while len(self.last_replies) > 1000:
            self.last_replies.popitem(last=False)

    def engine_stats(self) -> EngineStats | None:
        """Slots and KV state cache of the local engine (None for a remote server), summed over
        the loaded models when there are several. Cheap: read on the event loop."""
        if self.models is None:
            return self.backend.stats()
        found = [b.stats() for b in map(self.models.loaded, self.models.names()) if b is not None]
        stats = [s for s in found if s is not None]
        if not stats:
            return None
        return EngineStats(
            busy_slots=sum(s.busy_slots for s in stats),
            slots=sum(s.slots for s in stats),
            cached_states=sum(s.cached_states for s in stats),
            cache_bytes=sum(s.cache_bytes for s in stats),
            cache_limit_bytes=sum(s.cache_limit_bytes for s in stats),
            warm=stats[0].warm,  # the default model's
        )

    async def regenerate(self, scope: str, platform_message_id: str) -> Reply:
        """Write the newest answer again: the same prompt, a new seed. The new answer
        replaces the old one in the history when saved. Raises CannotRedo.

        `platform_message_id` is the message that answer answers: only the conversation's
        newest answer can be rewritten (an older one has later turns built on it)."""
        conversation = await self.store.conversation(scope)
        user, answer = await self._newest_answer(conversation, platform_message_id)
        options = self.options(conversation)
        async with self._using(conversation) as (backend, model):
            prompt = await self.build_prompt(conversation, below=answer.id, backend=backend, model=model)
            return self._start(conversation, prompt, options, user, resampled(options.sampling, answer.content), rewrites=answer)

    async def continue_answer(self, scope: str, platform_message_id: str) -> Reply:
        """Write more of the newest answer (it stopped at the length limit): the model
        continues that same assistant turn, and the saved answer is the old text followed by
        the new. Raises CannotRedo."""
        if not self.can_continue:
            raise CannotRedo(NO_CONTINUE)
        conversation = await self.store.conversation(scope)
        user, answer = await self._newest_answer(conversation, platform_message_id)
        options = self.options(conversation)
        async with self._using(conversation) as (backend, model):
            prompt = await self.build_prompt(conversation, open_answer=True, backend=backend, model=model)  # never cut: it raises CannotRedo instead
            prepared = prompt.prepared
            prompt = replace(prompt, prepared=replace(prepared, fmt=replace(prepared.fmt, continuing=True)))
            return self._start(conversation, prompt, options, user, rewrites=answer, prefix=answer.content)

    async def _newest_answer(self, conversation: Conversation, platform_message_id: str) -> tuple[StoredMessage, StoredMessage]:
        turn = await self.store.last_turn(conversation.id)
        if turn is None or turn[0].platform_message_id != platform_message_id:
            raise CannotRedo(NOT_NEWEST)
        user, answer = turn
        if answer is None:
            raise CannotRedo(NO_ANSWER)
        return user, answer

    async def settle(self, message_id: int) -> None:
        """A turn that got an apology instead of an answer still becomes part of the
        history (as it always was), so a restart does not answer it again."""
        await self.store.finish_turn(message_id, None)

    async def respond(self, message: UserMessage) -> Reply:
        """Store the user's message, then start generating the reply (the terminal chat)."""
        message_id = await self.receive(message)
        if message_id is None:
            raise ValueError(f"message {message.platform_message_id} was stored already")
        reply = await self.answer(message.scope, message_id)
        assert reply is not None
        return reply

    async def build_prompt(
        self,
        conversation: Conversation,
        *,
        include: int | None = None,
        below: int | None = None,
        open_answer: bool = False,
        upcoming: str | None = None,
        backend: Backend | None = None,
        model: str | None = None,
    ) -> Prompt:
        """The system prompt plus the newest turns that fit in n_ctx - n_predict.

        The oldest turn of the prompt stays put while everything after it fits,
        so consecutive prompts share their prefix and the engine's KV cache stays
        valid. When the history outgrows the window, old turns are dropped until
        the prompt is only WINDOW_REFILL full: room for several more exchanges
        before the next full re-evaluation, instead of one on every message.

        `below`: only the history older than that message (Regenerate: the prompt the
        answer was written from). `open_answer`: the newest message is an answer to
        continue, rendered without its closing markup (Continue; raises CannotRedo when
        it and its question no longer fit). `upcoming`: the prompt a message not yet sent will
        extend (a warm-up), from its author (that id, or ""): the history alone, rendered
        without a generation prompt, with UPCOMING_TOKENS kept for the message. `backend`: the
        model to build it for (default: the default model; `model` is its catalogue name).
        """
        backend = backend or self.backend
        template = self.template(self.template_name(conversation), backend)
        system = self.system_prompt(conversation)
        head = [Message("system", system)] if system.strip() else []
        budget = backend.n_ctx - self.options(conversation).n_predict
        start = self._window_start.get(conversation.scope)

        # Pick turns newest first by an estimate; the exact rendering is checked below.
        # Images count too; when they stop fitting, older ones give way to a placeholder
        # before any text is dropped (and stay placeholders in later prompts, which then
        # keep sharing their prefix with this one).
        picked: list[StoredMessage] = []
        costs: list[int] = []
        used = (await backend.prepare(template, head)).n_tokens if head else 0
        if upcoming is not None:
            used += UPCOMING_TOKENS
        overflow = False
        seeing = bool(self.settings.image_max_kb) and backend.image_support() is None
        images_from = self._images_from.get(conversation.scope)
        shown: dict[int, int] = {}  # message id -> tokens of its images, for messages whose images are in the prompt
        gave_way = False
        images_cut = False
        async for page in self._pages(conversation, start, include, below):
            counts = await backend.count([_content(m, True) for m in page])
            image_costs = await self._image_costs(page, backend) if seeing else {}
            for stored, count in zip(page, counts):
                cost = count + 8 + PLACEHOLDER_TOKENS * len(stored.images)
                if picked and used + cost > budget:  # older images (picked later) give way before this text is dropped
                    used = self._give_way(picked, costs, shown, include, used, budget - cost)
                    if used + cost > budget:
                        overflow = True
                        break
                    gave_way = True
                extra = image_costs.get(stored.id, 0)
                wanted = bool(extra) and not gave_way and (images_from is None or stored.id >= images_from or stored.id == include)
                if wanted and used + cost + extra <= budget:
                    shown[stored.id] = extra
                    cost += extra
                elif wanted:
                    gave_way = True
                    images_cut = images_cut or not picked  # the newest message's own images
                picked.append(stored)
                costs.append(cost)
                used += cost
            if overflow:
                break
        if overflow or gave_way:  # make room for the next turns: older images give way first...
            used = self._give_way(picked, costs, shown, include, used, budget * (WINDOW_REFILL if overflow else 1 - IMAGE_ROOM))
            gave_way = gave_way or (seeing and any(m.images and m.id not in shown for m in picked if m.id != include))
        if overflow:  # ...then slide the window: keep only the newest turns that fill WINDOW_REFILL of it
            while len(picked) > 1 and used > budget * WINDOW_REFILL:
                picked.pop()
                used -= costs.pop()
        if gave_way and picked:
            still = [m.id for m in picked if m.id in shown and m.id != include]
            threshold = min(still) if still else max(m.id for m in picked) + 1
            self._images_from[conversation.scope] = max(threshold, images_from or 0)
        picked.reverse()
        while picked and picked[0].role == "assistant":  # a prompt starts with a user turn
            picked.pop(0)
        if open_answer and (len(picked) < 2 or picked[-1].role != "assistant"):
            raise CannotRedo(TOO_LONG_TO_CONTINUE)

        cut = False
        kept = 1.0
        renderer: Template = OpenAnswer(template) if open_answer else HistoryOnly(template) if upcoming is not None else template
        while True:
            authors = {m.author_id or m.author_name for m in picked if m.role == "user"} | ({upcoming} if upcoming else set())
            names = shows_names(authors)
            messages = head + _merge_turns([await self._message(m, names, m.id in shown) for m in picked])
            prepared = await backend.prepare(renderer, messages)
            if prepared.n_tokens <= budget - (UPCOMING_TOKENS if upcoming is not None else 0) or (upcoming is not None and not picked):
                if picked:  # (a warm-up's too: the next message's prompt then starts where the warmed one does)
                    self._window_start[conversation.scope] = picked[0].id
                n_images = sum(len(m.images) for m in messages)
                return Prompt(prepared, messages, template, len(picked), cut, kept, images_cut, n_images, backend, model)
            if len(picked) > (2 if open_answer else 1):
                picked.pop(0)
                while len(picked) > 1 and picked[0].role == "assistant":
                    picked.pop(0)
                continue
            if open_answer:
                raise CannotRedo(TOO_LONG_TO_CONTINUE)
            if upcoming is not None:  # a message alone outgrows the window: nothing to warm
                picked = []
                continue
            # One message alone is too long: its images give way first, then keep its beginning
            # (text, then attached files), shortened in proportion.
            if picked and picked[0].id in shown:
                del shown[picked[0].id]
                images_cut = True
                continue
            if not picked or not picked[0].full_text:
                raise ValueError("the system prompt alone does not fit in the context window")
            only = picked[0]
            whole = only.full_text
            [content_tokens] = await backend.count([whole])
            keep = max(0.0, 1 - (prepared.n_tokens - budget + 8) / max(content_tokens, 1)) * 0.97
            picked = [replace(only, content=whole[: int(len(whole) * keep)], attachments=None)]
            kept *= keep
            cut = True

    @staticmethod
    def _give_way(picked: list[StoredMessage], costs: list[int], shown: dict[int, int], include: int | None, used: int, target: float) -> int:
        """Turn the images of the oldest picked turns (the newest one's excepted) into
        placeholders until `used` is at most `target`; returns what is used then."""
        for i in range(len(picked) - 1, 0, -1):
            if used <= target:
                break
            extra = shown.pop(picked[i].id, None) if picked[i].id != include else None
            if extra:
                costs[i] -= extra
                used -= extra
        return used

    async def _pages(
        self, conversation: Conversation, start: int | None, include: int | None, below: int | None
    ) -> AsyncIterator[list[StoredMessage]]:
        """Visible messages (and `include`, the turn being answered) newest first, in pages,
        stopping at the window's start."""
        page: list[StoredMessage] = []
        async for stored in self.store.newest_first(conversation.id, include=include, below=below):
            if start is not None and stored.id < start and stored.id != include:
                break  # the window still begins where it began last time
            page.append(stored)
            if len(page) == 32:
                yield page
                page = []
        if page:
            yield page


def resampled(sampling: Sampling, earlier: str) -> Sampling:
    """Sampling for Regenerate: a new seed, so the new answer can differ from `earlier`.

    With no fixed SEED the engine draws a fresh one anyway; a fixed SEED is moved by a
    hash of the answer being replaced (reproducible, and different each time). Greedy
    decoding (temperature 0) would only write the same answer again, so a regeneration
    samples at the default temperature instead."""
    seed = None if sampling.seed is None else (sampling.seed + zlib.crc32(earlier.encode())) % (1 << 31)
    temperature = sampling.temperature if sampling.temperature > 0 else Sampling().temperature
    return replace(sampling, seed=seed, temperature=temperature)


@dataclass(frozen=True)
class _Rendering:
    """A template rendered another way: the same name, stops and reply layout."""

    template: Template

    @property
    def name(self) -> str:
        return self.template.name

    @property
    def stop(self) -> tuple[str, ...]:
        return self.template.stop

    @property
    def harmony(self) -> bool:
        return self.template.harmony


@dataclass(frozen=True)
class HistoryOnly(_Rendering):
    """A template rendering the conversation so far without a generation prompt: the prefix
    the next message's prompt will start with (`ChatService.warm`)."""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        try:
            return self.template.render(messages, add_generation_prompt=False)
        except TemplateError:  # a template that insists on ending with a user turn: the prompt as it would be
            return self.template.render(messages, add_generation_prompt=add_generation_prompt)


@dataclass(frozen=True)
class OpenAnswer(_Rendering):
    """A template that leaves the last turn, an answer, open: Continue's prompt.

    The conversation is rendered with that answer the way the template writes past
    answers, minus the markup that closes it, so the model goes on with the same turn
    (`<|im_start|>assistant\nThe answer is` and no `<|im_end|>`). A template that cannot
    end on an answer (Mistral Nemo's puts the system prompt in the last user turn) gets
    its generation prompt with the answer after it instead, with an empty reasoning
    block closed first when that prompt opens one (DeepSeek-R1)."""

    @property
    def stop(self) -> tuple[str, ...]:
        # gpt-oss: the final channel is already open, so the end of that message ends the reply.
        return self.template.stop + (HARMONY_END if self.template.harmony else ())

    @property
    def harmony(self) -> bool:
        return False  # what follows an open answer is plain answer text, whatever the format

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        *earlier, answer = messages
        if answer.role != "assistant":
            raise ValueError("an open answer must be the last message")
        try:
            segments = self.template.render(messages, add_generation_prompt=False)
        except TemplateError:
            segments = []
        texts = [i for i, s in enumerate(segments) if not s.special]
        if texts and segments[texts[-1]].text == answer.content.strip():
            return segments[: texts[-1] + 1]
        segments = self.template.render(earlier, add_generation_prompt=True)
        markup = "".join(s.text for s in segments[-1:] if s.special).rstrip()
        if markup.endswith(THINK_OPEN):
            segments.append(Segment(f"\n{THINK_CLOSE}\n\n", True))
        return segments + [Segment(answer.content.strip(), False)]


def _content(message: StoredMessage, names: bool) -> str:
    if names and message.role == "user" and message.author_name:
        return f"{message.author_name}: {message.full_text}"
    return message.full_text


def _merge_turns(messages: list[Message]) -> list[Message]:
    """Join consecutive turns of one role (several people spoke before the bot answered);
    the joined turn has the images of both, in order."""
    merged: list[Message] = []
    for m in messages:
        if merged and merged[-1].role == m.role:
            merged[-1] = Message(m.role, f"{merged[-1].content}\n\n{m.content}", merged[-1].images + m.images)
        else:
            merged.append(m)
    return merged


def engine_options(settings: Settings, *, parallel: int | None = None) -> EngineOptions:
    from bot.engine.local import EngineOptions

    return EngineOptions(
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        parallel=parallel or settings.parallel,
        kv_cache_mb=settings.kv_cache_mb,
        flash_attn=settings.flash_attn,
        flash_attn_cache=settings.resolved_flash_attn_cache(),
        n_predict=settings.n_predict,
        warm_ttl_s=settings.warm_ttl_s,
        llama_log=settings.llama_log,
        kv_type=settings.kv_type,
        kv_disk_dir=settings.resolved_kv_disk_dir(),
        kv_disk_mb=settings.kv_disk_mb,
        mmproj=settings.mmproj_path,
    )


@contextlib.asynccontextmanager
async def open_chat(settings: Settings, *, parallel: int | None = None, abort: threading.Event | None = None) -> AsyncIterator[ChatService]:
    """Take the database's serving lock, load the model, open the store, and close both
    afterwards (whatever happens). Raises AlreadyServing, before the model loads, when
    another process serves the same database.

    Setting `abort` while the model loads stops the load (a shutdown signal)."""
    with serving(settings.database_path):
        models: Models | None = await open_models(settings, parallel=parallel, abort=abort)
        backend = models.default_backend if models is not None else await open_backend(settings, parallel=parallel, abort=abort)
        if models is None and settings.backend == "openai":
            from bot.engine.remote import RemoteBackend, RemoteModels

            assert isinstance(backend, RemoteBackend)
            models = RemoteModels(backend)  # the server's models, chosen per conversation
        try:
            store = await Store.open(settings.database_path, wait_s=settings.database_wait_s)
            try:
                yield ChatService(backend, store, settings, models)
            finally:
                await store.close()
        finally:
            await (models or backend).close()


async def open_models(settings: Settings, *, parallel: int | None = None, abort: threading.Event | None = None) -> ModelPool | None:
    """The catalogue's models (MODELS, MODELS_DIR) in a pool with the default one loaded; None
    when there is only the one model (or the models are a server's)."""
    if settings.backend != "local" or not (settings.models or settings.models_dir is not None):
        return None
    catalogue = settings.catalogue()
    if len(catalogue) < 2:
        return None
    from bot.engine.pool import ModelPool, entry_options

    base = engine_options(settings, parallel=parallel)
    return await ModelPool.open(
        catalogue,
        lambda entry: entry_options(base, entry),
        budget_bytes=settings.resolved_model_memory_mb() * 1024 * 1024,
        idle_unload_s=settings.model_idle_unload_s,
        disk_dir=settings.resolved_kv_disk_dir(),
        disk_bytes=settings.kv_disk_mb * 1024 * 1024,
        abort=abort,
    )


async def open_backend(settings: Settings, *, parallel: int | None = None, abort: threading.Event | None = None) -> Backend:
    """The configured backend: the local engine (default) or a remote OpenAI-compatible server."""
    if settings.backend == "openai":
        from bot.engine.remote import RemoteBackend

        return await RemoteBackend.connect(settings)
    from bot.engine.local import Engine, LocalBackend

    options = engine_options(settings, parallel=parallel)
    if settings.models_dir is not None:  # MODEL_PATH in MODELS_DIR takes the projector found beside it there
        options = replace(options, mmproj=settings.catalogue()[0].mmproj)
    engine = await Engine.load(settings.resolved_model_path(), options, abort=abort)
    return LocalBackend(engine)


__all__ = [
    "ChatService", "Reply", "UserMessage", "Prompt", "TemplateChoiceError", "SettingError", "ChannelOptions", "LastReply",
    "EngineStats", "CannotRedo", "OpenAnswer", "ImageInput", "ModelChoiceError", "ModelUnavailable", "ModelStatus",
]
