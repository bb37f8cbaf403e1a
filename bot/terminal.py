"""The terminal chat: the seed's `[USER]:` / `[ASSISTANT]:` loop, on the same engine and store.

Typing `/reset` clears the history and `/template NAME` switches template, as
the Discord slash commands do; `/image PATH [text]` sends a picture (with a question)
to a model that can see. Ctrl-C while a reply is being written stops that
reply; Ctrl-C at the prompt, `/quit` or the end of input (piped stdin) ends the chat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO

from bot.conversations.images import ImageInput
from bot.conversations.service import ChatService, ModelChoiceError, ModelUnavailable, Reply, TemplateChoiceError, UserMessage
from bot.formats.templates import NAMES

log = logging.getLogger(__name__)

SCOPE = "terminal:default"
HELP = "commands: /image PATH [text] (show the model a picture), /reset (forget this conversation), /template [NAME], /model [NAME], /quit"


def _pollable(stream: TextIO) -> bool:
    """Whether the event loop can wait on `stream`: a terminal, a pipe or a socket. Regular files
    and other character devices (/dev/null, a service's or container's stdin) cannot be polled:
    asyncio would accept them, and epoll then refuses them."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stream.isatty() or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def _line_reader() -> Callable[[], Awaitable[str]]:
    """Read stdin without a blocking thread where possible, so Ctrl-C at the prompt ends at once."""
    if not _pollable(sys.stdin):  # a file, /dev/null: a thread it is (it never blocks for long)
        return lambda: asyncio.to_thread(sys.stdin.readline)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):
        return lambda: asyncio.to_thread(sys.stdin.readline)

    async def read() -> str:
        return (await reader.readline()).decode("utf-8", "replace")

    return read


class TerminalChat:
    """Reads lines from stdin, writes replies to stdout as they are generated."""

    scope = SCOPE

    def __init__(self, chat: ChatService, *, scope: str = SCOPE, out: TextIO = sys.stdout) -> None:
        self.chat = chat
        self.scope = scope
        self.out = out
        self._reply_running: asyncio.Task[None] | None = None
        self._current: Reply | None = None
        self._main: asyncio.Task[None] | None = None
        self._leaving = False

    def _say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        echo = not sys.stdin.isatty()  # piped input: show it, so the transcript reads like a chat
        read_line = await _line_reader()
        self._main = asyncio.current_task()
        try:
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
        while True:
            self._say("[USER]:\n")
            try:
                line = await read_line()
            except asyncio.CancelledError:
                if self._leaving:  # Ctrl-C at the prompt
                    self._say("\n")
                    return
                raise
            if line == "":  # end of input
                return
            text = line.strip()
            if not text:
                continue
            if echo:
                self._say(text + "\n")
            if text.startswith("/"):
                if not await self._command(text):
                    return
                continue
            self._reply_running = asyncio.ensure_future(self._reply(text))
            try:
                await self._reply_running
            finally:
                self._reply_running = None

    def _interrupt(self) -> None:
        """Ctrl-C: stop the reply being written, or leave when idle."""
        if self._reply_running is not None and self._current is not None:
            self._current.stop()
        elif self._main is not None:
            self._leaving = True
            self._main.cancel()

    async def _reply(self, text: str, images: Sequence[ImageInput] = ()) -> None:
        notes: list[str] = []
        try:
            message_id = await self.chat.receive(UserMessage(self.scope, text, author_id="terminal", author_name="user"))
            assert message_id is not None  # terminal messages have no platform id: never seen twice
            if images:
                notes = await self.chat.add_images(message_id, images)
                stored = await self.chat.message(message_id)
                if stored is not None and not stored.content and not stored.images:  # nothing left to answer
                    await self.chat.expire(message_id)
                    self._say("".join(f"[INFO] {note}\n" for note in notes))
                    return
            loading = await self.chat.model_to_load(self.scope)
            if loading is not None:
                self._say(f"[INFO] Loading model {loading}\u2026\n")
            reply = await self.chat.answer(self.scope, message_id)
            assert reply is not None
        except ModelUnavailable as exc:  # this conversation's model cannot serve: say why, keep the chat going
            await self.chat.settle(message_id)
            self._say(f"[ERROR] {exc}\n")
            return
        except Exception as exc:  # e.g. the disk is full: say so, keep the chat going
            log.exception("could not answer")
            self._say(f"[ERROR] Could not answer: {exc}\n")
            return
        reply.notes[:0] = notes
        self._current = reply
        try:
            self._say("[ASSISTANT]:\n")
            wrote = await self._show(reply)
            final = await reply.text()
            if not wrote:
                self._say(final)
            if reply.finish_reason == "cancelled":
                self._say(" [stopped]")
            elif reply.finish_reason == "error":
                self._say(f"Sorry, something went wrong while answering: {reply.generation.error}")
            for note in reply.notes:
                self._say(f"\n{note}")
            self._say("\n")
            try:
                await reply.save()
            except Exception as exc:
                log.exception("could not store the reply")
                self._say(f"[ERROR] Could not store that reply: {exc}\n")
        finally:
            self._current = None

    async def _show(self, reply: Reply) -> bool:
        """Write the reply as it is generated; returns whether any answer text was written.

        A reasoning model's thoughts follow THINKING, as on Discord: `hide` shows only
        "(thinking…)" and how long it took; `spoiler` and `show` print them, marked."""
        gen = reply.generation
        mode = reply.thinking  # the conversation's own, else THINKING
        reasoning_shown = answer_shown = 0
        said_thinking = False
        async for _ in gen.updates():
            if gen.reasoning and mode != "hide" and len(gen.reasoning) > reasoning_shown:
                if not reasoning_shown:
                    self._say("(thinking) ")
                    gen_reasoning = gen.reasoning.lstrip()
                    reasoning_shown = len(gen.reasoning) - len(gen_reasoning)
                self._say(gen.reasoning[reasoning_shown:])
                reasoning_shown = len(gen.reasoning)
            elif gen.thinking and mode == "hide" and not said_thinking:
                self._say("(thinking\u2026)")
                said_thinking = True
            answer = gen.text.lstrip()
            if answer and not answer_shown:
                if reasoning_shown or said_thinking:
                    self._say(f" (thought for {gen.thought_s or 0:.0f} s)\n" if mode == "hide" else "\n\n")
                answer_shown = len(gen.text) - len(answer)
            if answer and len(gen.text) > answer_shown:
                self._say(gen.text[answer_shown:])
                answer_shown = len(gen.text)
        if (reasoning_shown or said_thinking) and not answer_shown:
            self._say("\n")
        return answer_shown > 0

    async def _command(self, text: str) -> bool:
        """Handle a /command. Returns False to end the chat."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            removed = await self.chat.reset(self.scope)
            self._say(f"[INFO] Conversation cleared ({removed} messages).\n")
        elif name == "/image":
            await self._image(arg)
        elif name == "/template":
            if arg:
                try:
                    key = await self.chat.set_template(self.scope, arg)
                except TemplateChoiceError as exc:
                    self._say(f"[ERROR] {exc}\n")
                else:
                    self._say(f"[INFO] Prompt template: {key}\n")
            else:
                conversation = await self.chat.conversation(self.scope)
                self._say(f"[INFO] Prompt template: {self.chat.describe_template(conversation)}; available: {', '.join(NAMES)}\n")
        elif name == "/model":
            await self._model(arg)
        else:
            self._say(f"[INFO] {HELP}\n")
        return True

    async def _model(self, arg: str) -> None:
        """/model [NAME]: show the models (MODELS, MODELS_DIR), or switch this conversation's."""
        names = self.chat.model_names()
        if not names:
            self._say(f"[INFO] Only one model is offered: {self.chat.backend.info.path.name} (set MODELS or MODELS_DIR to offer more)\n")
            return
        if not arg:
            current = self.chat.model_name(await self.chat.conversation(self.scope))
            loaded = [m.name for m in self.chat.model_status() if m.loaded]
            self._say(f"[INFO] Model: {current}; available: {', '.join(names)}; loaded: {', '.join(loaded)}\n")
            return
        try:
            chosen = await self.chat.set_model(self.scope, arg)
        except ModelChoiceError as exc:
            self._say(f"[ERROR] {exc}\n")
        else:
            self._say(f"[INFO] Model: {chosen}\n")

    async def _image(self, arg: str) -> None:
        """/image PATH [text]: send a picture, and what to ask about it, as one message."""
        try:
            words = shlex.split(arg)
        except ValueError:
            words = arg.split()
        if not words:
            self._say("[INFO] usage: /image PATH [text], e.g. /image cat.png What is this?\n")
            return
        note = self.chat.image_note()
        if note:
            self._say(f"[INFO] {note}\n")
            return
        path = Path(words[0]).expanduser()
        try:
            size = path.stat().st_size
            refusal = self.chat.image_refusal(path.name, size)
            data = b"" if refusal else path.read_bytes()
        except OSError as exc:
            self._say(f"[ERROR] Cannot read {path}: {exc.strerror or exc}\n")
            return
        if refusal:
            self._say(f"[INFO] {refusal}\n")
            return
        self._reply_running = asyncio.ensure_future(self._reply(" ".join(words[1:]), [ImageInput(path.name, data)]))
        try:
            await self._reply_running
        finally:
            self._reply_running = None
