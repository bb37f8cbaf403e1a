"""What the conversation layer hands out: conversations, stored messages, their states, and what
can go wrong storing them. Plain data: the front ends read these; only `store` writes them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum


class MessageStatus(str, Enum):
    """Where a stored message stands (see migrations/0002_discord.sql and 0003_durable.sql)."""

    OK = "ok"  # part of the conversation
    STOPPED = "stopped"  # an answer cut short by /stop: still part of it
    UNDELIVERED = "undelivered"  # an answer the platform refused: never shown to the model as said
    PENDING = "pending"  # a message waiting for its answer: not part of the conversation yet
    EXPIRED = "expired"  # a message that waited across a restart for too long: never answered

    __str__ = str.__str__


VISIBLE = (MessageStatus.OK, MessageStatus.STOPPED)
"""The statuses that reach prompts."""


class ChatMode(IntEnum):
    """Which messages of a channel the bot answers (/chat; stored in conversations.chat_enabled)."""

    OFF = 0  # mentions and replies to the bot only
    ON = 1  # every message
    THREADS = 2  # a new thread for each mention; every message answered in those threads


class StoreError(Exception):
    """The database cannot be used. The message is one line for the user."""


class StoreBusy(Exception):
    """Another program held the database's lock for longer than DATABASE_WAIT_S: nothing was
    written. Transient: the caller keeps what it has and tries again later."""


@dataclass(frozen=True)
class Conversation:
    id: int
    scope: str
    template: str | None
    system_prompt: str | None
    chat_mode: ChatMode
    channel_id: str | None = None  # the platform channel (where to read what arrived while down)
    # The channel's own settings (/settings); None: the configured default.
    temperature: float | None = None
    top_p: float | None = None
    n_predict: int | None = None
    thinking: str | None = None
    model: str | None = None  # the catalogue model it is answered by (/model); None: the default


@dataclass(frozen=True)
class StoredImage:
    """An image of a message, as stored: its file name and what identifies its bytes."""

    name: str
    sha256: str  # of the stored bytes (read them with `Store.image_data`)
    mime: str  # "image/png" or "image/jpeg"
    width: int
    height: int
    size: int  # bytes stored


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    author_id: str | None
    author_name: str | None
    platform_message_id: str | None
    created_at: str
    token_count: int | None
    status: MessageStatus
    reasoning: str | None = None
    # For a pending turn: the bot's message already posted for it. For an answer: the last of
    # the messages it was posted as (a long answer takes several; platform_message_id is the first).
    reply_message_id: str | None = None
    attachments: str | None = None  # attached text files as put in the prompt (kept apart: edits change `content` only)
    images: tuple[StoredImage, ...] = ()  # its images, in order (their bytes: `Store.image_data`)

    @property
    def full_text(self) -> str:
        """What the model reads of this message: its text, then its attached files."""
        if not self.attachments:
            return self.content
        return f"{self.content}\n\n{self.attachments}" if self.content else self.attachments


@dataclass(frozen=True)
class PendingTurn:
    """A stored message still waiting for its answer, with where it was said."""

    message: StoredMessage
    scope: str
    channel_id: str | None
