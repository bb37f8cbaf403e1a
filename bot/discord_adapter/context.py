"""What every part of the Discord adapter shares: one small context object.

The features (intake, replies, buttons, commands, recovery, following edits) are
separate cogs; they do not call each other through the bot, they share this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from bot.config import Settings
from bot.conversations.scheduler import FairScheduler
from bot.conversations.service import ChatService, Reply
from bot.discord_adapter.output import EditBudget


@dataclass(frozen=True)
class Writing:
    """A reply being written, with the Discord message it answers and who wrote that."""

    reply: Reply
    answered: int  # the Discord id of the user's message
    author: int  # its author: they (and admins) may stop it


class Replies:
    """The replies being written, by conversation (/stop) and by the message they answer
    (the Stop button, a delete of that message), and the answers being rewritten."""

    def __init__(self) -> None:
        self._by_scope: dict[str, Writing] = {}
        self._by_message: dict[int, Writing] = {}
        self.redoing: set[int] = set()  # answered message ids with a Regenerate/Continue queued or running

    def add(self, scope: str, writing: Writing) -> None:
        self._by_scope[scope] = writing
        self._by_message[writing.answered] = writing

    def remove(self, scope: str, writing: Writing) -> None:
        if self._by_scope.get(scope) is writing:
            del self._by_scope[scope]
        if self._by_message.get(writing.answered) is writing:
            del self._by_message[writing.answered]

    def in_scope(self, scope: str) -> Writing | None:
        return self._by_scope.get(scope)

    def reply_in(self, scope: str) -> Reply | None:
        writing = self._by_scope.get(scope)
        return writing.reply if writing is not None else None

    def answering(self, message_id: int) -> Writing | None:
        return self._by_message.get(message_id)

    def __iter__(self) -> Iterator[Writing]:
        return iter(list(self._by_scope.values()))

    def __len__(self) -> int:
        return len(self._by_scope)


@dataclass
class BotContext:
    """Settings, the conversation service, the fair queue, the edit budget and the replies in progress."""

    settings: Settings
    chat: ChatService
    scheduler: FairScheduler
    edit_budget: EditBudget = field(default_factory=EditBudget)
    replies: Replies = field(default_factory=Replies)
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)  # set once restart work is done; live messages wait for it
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def create(cls, settings: Settings, chat: ChatService) -> BotContext:
        return cls(settings, chat, FairScheduler(settings.parallel, settings.max_queue))

    def in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` without waiting for it (cancelled at shutdown)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()

    def stop_all(self) -> None:
        """Stop every reply being written (keeping what was written): the shutdown's grace is over."""
        for writing in self.replies:
            writing.reply.stop()
