"""A small but faithful fake of the Discord API (REST + gateway) for tests.

Why this exists: the bot is built on discord.py, whose behaviour (reconnects,
rate-limit retries, interaction responses, mention handling ...) is only really
exercised by talking to something that speaks Discord's wire protocol.  This
module serves such a thing with aiohttp on ``127.0.0.1`` (random free port), so
the *real* discord.py client can connect to it unmodified::

    fake = FakeDiscord()
    await fake.start()
    guild = fake.add_guild("test")
    chan = fake.add_channel(guild, "general")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice)
    async with fake.running(bot):          # patches discord.py, starts the client, waits for ready
        await fake.send_message(chan, alice, "hello")
        [reply] = await fake.wait_for_bot_message(chan)
    await fake.close()

``fake.running(client)`` is a convenience; the manual way is to set
``discord.http.Route.BASE = fake.api_base`` and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)``
before ``client.start(fake.token)``.

Design notes
------------
* Every piece of world state is a plain JSON-ish ``dict`` shaped like the
  Discord payload, so what tests inspect is what discord.py receives.  Keys
  that start with ``_`` (``_pinged``, ``_edits`` ...) are bookkeeping for tests
  and are never sent over the wire.
* Gateway events go through one ordered outbox, flushed under a lock, so the
  order in which the test causes things is the order the client sees them, also
  across IDENTIFY/RESUME handshakes.  Each gateway session buffers what it was
  sent, so a RESUME replays exactly the events after the client's last ``seq``.
* The fake mimics Discord's checks that matter for a bot: content length and
  empty-message errors, allowed_mentions, permissions for deleting other
  people's messages and for threads, component layout (rows, custom ids),
  thread names, the 3 second interaction acknowledgement deadline,
  intents (event filtering and MESSAGE_CONTENT stripping), privileged intents.
* All times recorded for tests (``requests[i]["time"]``, ``typing``,
  ``_edits``, ``edit_log``, interaction ``created_at``/``acked_at``) are
  ``time.monotonic()``.
* ``send_message`` & co. work with no client connected: the message is stored
  (history serves it later) and the event reaches nobody, as on Discord.

Driving the bot as users do
---------------------------
* ``send_message(channel, user, text)``, ``edit_message``, ``delete_message``,
  ``add_reaction`` / ``remove_reaction``; ``channel`` may be a thread.
* ``invoke_command("name sub", user=, channel=, options=)`` runs a synced
  slash command (also in a thread); ``press_button(message, custom_id, user)``
  clicks a button on a message (ephemeral ones too).  Both return an
  :class:`Interaction` recording the callbacks, ``original``, ``followups``,
  ``content``, ``embeds``, ``files``, ``ephemeral`` and ``errors``.
* ``start_thread(channel, user, name, message=None)`` opens a thread as a user;
  ``add_channel(guild, name, type=11, parent_id=...)`` makes one outright.
* ``set_role_permissions(guild, role, bits)`` changes a role (``role=guild``
  for @everyone), e.g. to take a permission away from the bot.
* ``set_command_permissions(guild, "name", {user_or_role_id: bool})`` is a
  server admin's per-command override (Integrations settings): it lets a
  member use a command hidden by ``default_member_permissions``, or denies it.

Observing
---------
* ``messages(channel)``, ``bot_messages(channel)``, ``message(id)``,
  ``threads_of(channel)``, ``requests`` / ``requests_to(method, regex)``,
  ``events`` (gateway frames sent), ``commands`` (synced, by scope),
  ``interactions``, ``edit_log`` and ``max_edits_in_window(channel, seconds)``.
* ``edit_rate_limit = (n, seconds)`` makes PATCHes of channel messages beyond
  ``n`` per channel per window answer 429 like Discord (``retry_after``,
  ``global: false``, ``X-RateLimit-*`` with scope "user"); discord.py sleeps
  and retries.  The fake sends no rate-limit headers on successful responses,
  so a client only learns of the limit from the 429 (no pre-emptive waits).

Tips
----
* discord.py sleeps 5 s in ``Client.before_identify_hook`` before every
  IDENTIFY except the first (second shard, re-IDENTIFY after op 9).  Test
  clients should override it with a no-op; RESUMEs are not delayed.
* Pass ``guild_ready_timeout=0.1`` to the client: discord.py waits that long
  after the last GUILD_CREATE before ``on_ready``.
* Close the client before the fake (``running()`` does); a fake closed first
  makes discord.py retry connecting with backoff.
* Wait for bot replies with ``wait_for_bot_message(channel, after=trigger)``
  rather than sleeping; it is race-free.
* discord.py retries 500/502/504 after 1 + 2*n seconds (so a 500 costs ~1 s)
  and does *not* retry 503 (it raises DiscordServerError); 429s wait
  ``retry_after``.

Not modelled: voice, presences, channel permission overwrites (permissions
are guild-level from roles), role mentionability, select menus and modal
submissions (a type 9 callback is only recorded), Components V2 layouts
(stored, not checked), message forwards, polls, bulk delete, pins, thread
membership (THREAD_MEMBERS_UPDATE, private-thread visibility: every thread
event reaches the bot), thread archiving/locking and the THREAD_CREATED (18)
notice in the parent channel, forum channels, rate limits other than the
opt-in edit limit (and ``fail_next``), gateway rate limits and zlib
compression (plain JSON text frames are sent), interaction token expiry
(15 min).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import json
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

__all__ = ["FakeDiscord", "Intents", "Interaction", "Permissions"]

DISCORD_EPOCH_MS = 1420070400000
API_VERSION = 10


class Intents:
    """Gateway intent bits the fake honours (see Discord's gateway docs)."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    GUILD_MESSAGE_REACTIONS = 1 << 10
    GUILD_MESSAGE_TYPING = 1 << 11
    DIRECT_MESSAGES = 1 << 12
    DIRECT_MESSAGE_REACTIONS = 1 << 13
    DIRECT_MESSAGE_TYPING = 1 << 14
    MESSAGE_CONTENT = 1 << 15
    PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT


class Permissions:
    """Permission bits used by the fake."""

    CREATE_INSTANT_INVITE = 1 << 0
    ADMINISTRATOR = 1 << 3
    ADD_REACTIONS = 1 << 6
    STREAM = 1 << 9
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_EXTERNAL_EMOJIS = 1 << 18
    CONNECT = 1 << 20
    SPEAK = 1 << 21
    USE_VAD = 1 << 25
    CHANGE_NICKNAME = 1 << 26
    USE_APPLICATION_COMMANDS = 1 << 31
    MANAGE_THREADS = 1 << 34
    CREATE_PUBLIC_THREADS = 1 << 35
    CREATE_PRIVATE_THREADS = 1 << 36
    USE_EXTERNAL_STICKERS = 1 << 37
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 51) - 1
    # What Discord gives @everyone in a new guild (notably *without* MANAGE_MESSAGES).
    DEFAULT_EVERYONE = (
        CREATE_INSTANT_INVITE
        | ADD_REACTIONS
        | STREAM
        | VIEW_CHANNEL
        | SEND_MESSAGES
        | EMBED_LINKS
        | ATTACH_FILES
        | READ_MESSAGE_HISTORY
        | MENTION_EVERYONE
        | USE_EXTERNAL_EMOJIS
        | CONNECT
        | SPEAK
        | USE_VAD
        | CHANGE_NICKNAME
        | USE_APPLICATION_COMMANDS
        | CREATE_PUBLIC_THREADS
        | CREATE_PRIVATE_THREADS
        | USE_EXTERNAL_STICKERS
        | SEND_MESSAGES_IN_THREADS
    )


# Message flags / types used here.
FLAG_HAS_THREAD = 1 << 5
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_COMPONENTS_V2 = 1 << 15
TYPE_DEFAULT = 0
TYPE_REPLY = 19
TYPE_CHAT_INPUT_COMMAND = 20
TYPE_THREAD_STARTER_MESSAGE = 21

# Interaction types.
IT_APPLICATION_COMMAND, IT_MESSAGE_COMPONENT = 2, 3

# Component types / button styles.
COMPONENT_ACTION_ROW, COMPONENT_BUTTON = 1, 2
BUTTON_LINK, BUTTON_PREMIUM = 5, 6

# Channel types.
CH_TEXT, CH_DM, CH_VOICE, CH_CATEGORY, CH_NEWS = 0, 1, 2, 4, 5
CH_NEWS_THREAD, CH_PUBLIC_THREAD, CH_PRIVATE_THREAD = 10, 11, 12
CH_THREAD_TYPES = (CH_NEWS_THREAD, CH_PUBLIC_THREAD, CH_PRIVATE_THREAD)
THREAD_ARCHIVE_DURATIONS = (60, 1440, 4320, 10080)

_MENTION_USER_RE = re.compile(r"<@!?(\d+)>")
_MENTION_ROLE_RE = re.compile(r"<@&(\d+)>")
_MENTION_EVERYONE_RE = re.compile(r"@(everyone|here)")
_COMMAND_NAME_RE = re.compile(r"^[-_\w]{1,32}$")
_SUBCOMMAND_TYPES = (1, 2)

JSON = dict[str, Any]
ChannelRef = JSON | str | int


# --------------------------------------------------------------------------- helpers


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """JSON response whose Content-Type is *exactly* ``application/json``.

    discord.py compares the header with ``==``; aiohttp's ``json_response``
    appends ``; charset=utf-8`` which would make discord.py treat bodies as text.
    """
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, code: int = 0, errors: JSON | None = None) -> web.Response:
    body: JSON = {"message": message, "code": code}
    if errors is not None:
        body["errors"] = errors
    return _json(body, status)


def _form_error(errors: JSON) -> web.Response:
    """Discord's 400 "Invalid Form Body" (code 50035)."""
    return _error(400, "Invalid Form Body", 50035, errors)


def _field_error(code: str, message: str) -> JSON:
    return {"_errors": [{"code": code, "message": message}]}


def _invalid(path: str, code: str, message: str) -> web.Response:
    """400 "Invalid Form Body" for one field; ``path`` is dotted (``"embeds.0.title"``), nested like Discord's."""
    errors: JSON = _field_error(code, message)
    for key in reversed(path.split(".")) if path else []:
        errors = {key: errors}
    return _form_error(errors)


_Problem = tuple[str, str, str]  # (dotted path, error code, message) of a form validation failure


def _rate_limited(retry_after: float, *, limit: int, bucket: str | None = None) -> web.Response:
    """Discord's per-route 429 (scope "user"), as discord.py reads it: JSON body + ``Via`` header."""
    headers = {
        "Via": "1.1 google",  # discord.py treats a 429 without Via as a Cloudflare ban
        "Retry-After": str(max(1, math.ceil(retry_after))),
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
        "X-RateLimit-Reset-After": f"{retry_after:.3f}",
        "X-RateLimit-Scope": "user",
    }
    if bucket is not None:
        headers["X-RateLimit-Bucket"] = bucket
    body = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3), "global": False, "code": 0}
    return _json(body, 429, headers)


def _no_content() -> web.Response:
    return web.Response(status=204)


def _public(obj: JSON) -> JSON:
    """Copy of a stored payload without the test-only ``_`` keys."""
    return {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}


def _iso_from_snowflake(snowflake: str) -> str:
    ms = (int(snowflake) >> 22) + DISCORD_EPOCH_MS
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat()


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _cid(ref: ChannelRef) -> str:
    """Accept a payload dict or an id; return the id as a string."""
    return str(ref["id"]) if isinstance(ref, dict) else str(ref)


def _emoji_payload(emoji: str) -> JSON:
    """``name:id`` (custom) or a unicode emoji -> partial emoji payload."""
    name, sep, emoji_id = emoji.rpartition(":")
    if sep and emoji_id.isdigit():
        animated = name.startswith("a:")
        return {"id": emoji_id, "name": name[2:] if animated else name, "animated": animated}
    return {"id": None, "name": emoji}


def _numbered_components(components: list[JSON]) -> list[JSON]:
    """Copy of ``components`` where every component has an ``id``, as Discord returns them.

    Discord numbers components without an ``id`` (or with ``id: 0``) sequentially,
    depth first, skipping ids already used in the message.
    """
    out = copy.deepcopy(components)
    nodes: list[JSON] = []

    def walk(items: Iterable[Any]) -> None:
        for item in items:
            if not isinstance(item, dict):
                continue
            nodes.append(item)
            walk(item.get("components") or [])
            if isinstance(item.get("accessory"), dict):
                walk([item["accessory"]])

    walk(out)
    used = {n["id"] for n in nodes if n.get("id")}
    next_id = 1
    for node in nodes:
        if not node.get("id"):
            while next_id in used:
                next_id += 1
            node["id"] = next_id
            used.add(next_id)
    return out


def _iter_components(components: Iterable[Any]) -> Iterator[JSON]:
    """Every component, depth first (action rows and their children)."""
    for item in components:
        if isinstance(item, dict):
            yield item
            yield from _iter_components(item.get("components") or [])
            if isinstance(item.get("accessory"), dict):
                yield item["accessory"]


def _component_problem(components: Any, flags: int) -> _Problem | None:
    """Discord's checks on classic message components (action rows of buttons / selects).

    Components V2 layouts (flag 1 << 15) are stored unchecked.
    """
    if flags & FLAG_COMPONENTS_V2 or not isinstance(components, list):
        return None
    if len(components) > 5:
        return "components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length."
    custom_ids: set[str] = set()
    for i, row in enumerate(components):
        where = f"components.{i}"
        if not isinstance(row, dict) or row.get("type") != COMPONENT_ACTION_ROW:
            return f"{where}.type", "UNION_TYPE_CHOICES", "Value of field \"type\" must be one of (1,)."
        children = row.get("components") or []
        if not children:
            return f"{where}.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
        width = sum(5 if c.get("type") != COMPONENT_BUTTON else 1 for c in children)
        if width > 5:
            return where, "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "The specified component exceeds the maximum width"
        for j, child in enumerate(children):
            loc = f"{where}.components.{j}"
            custom_id = child.get("custom_id")
            if child.get("type") == COMPONENT_BUTTON:
                style = child.get("style")
                if style == BUTTON_LINK:
                    if not child.get("url"):
                        return f"{loc}.url", "BASE_TYPE_REQUIRED", "This field is required"
                    if custom_id is not None:
                        message = "A custom id cannot be set for a link button"
                        return f"{loc}.custom_id", "BUTTON_COMPONENT_CUSTOM_ID_NOT_ALLOWED", message
                elif style != BUTTON_PREMIUM and not custom_id:
                    return f"{loc}.custom_id", "BASE_TYPE_REQUIRED", "This field is required"
                if len(child.get("label") or "") > 80:
                    return f"{loc}.label", "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length."
            if custom_id is not None:
                if not 1 <= len(str(custom_id)) <= 100:
                    return f"{loc}.custom_id", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                if custom_id in custom_ids:
                    message = "Component custom id cannot be duplicated"
                    return f"{loc}.custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED", message
                custom_ids.add(custom_id)
    return None


# --------------------------------------------------------------------------- records


@dataclass(eq=False)
class _Session:
    """One gateway session (survives websocket reconnects through RESUME)."""

    session_id: str
    shard: tuple[int, int] | None
    intents: int
    ws: web.WebSocketResponse | None = None
    seq: int = 0
    # (seq, serialized frame) of everything sent, for RESUME replay.
    buffer: collections.deque[tuple[int, str]] = field(default_factory=lambda: collections.deque(maxlen=5000))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    alive: bool = True

    def covers_guild(self, guild_id: str) -> bool:
        if self.shard is None:
            return True
        shard_id, count = self.shard
        return (int(guild_id) >> 22) % count == shard_id

    @property
    def shard_id(self) -> int:
        return 0 if self.shard is None else self.shard[0]


@dataclass(eq=False)
class _Connection:
    """One open gateway websocket."""

    ws: web.WebSocketResponse
    request: web.Request
    session: _Session | None = None
    server_close_code: int | None = None


@dataclass
class _Event:
    """A gateway dispatch waiting in the outbox."""

    name: str
    data: JSON
    guild_id: str | None  # None: DM / global event -> shard 0 (or unsharded sessions)
    intent: int | None
    strip_content: bool = False


@dataclass
class _Call:
    """A parsed REST request, handed to route handlers."""

    method: str
    path: str
    query: Mapping[str, str]
    json: Any
    files: list[JSON]
    record: JSON


@dataclass
class _FailureRule:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: float


_Handler = Callable[..., Awaitable[web.Response]]


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: _Handler
    auth: bool = True


class Interaction:
    """What happened to one interaction: a slash command (:meth:`FakeDiscord.invoke_command`)
    or a button press (:meth:`FakeDiscord.press_button`).

    ``responses`` are the raw callback payloads, ``followups`` the followup
    messages, ``original`` the current ``@original`` message (``None`` before
    an answer or after deletion).  For a button press answered with type 6
    (DEFERRED_UPDATE_MESSAGE) or 7 (UPDATE_MESSAGE), ``@original`` is the
    message the button is on, as on Discord.  Ephemeral messages live only
    here, never in the channel, just like on Discord.
    """

    def __init__(
        self,
        fake: FakeDiscord,
        payload: JSON,
        channel: JSON,
        user: JSON,
        *,
        command: JSON | None = None,
        message: JSON | None = None,
    ) -> None:
        self._fake = fake
        self.payload: JSON = payload  # the INTERACTION_CREATE data
        self.id: str = payload["id"]
        self.token: str = payload["token"]
        self.type: int = payload["type"]  # 2 application command, 3 message component
        self.command: JSON | None = command  # the synced command (slash commands)
        self.message: JSON | None = message  # the message whose component was used (button presses)
        self.custom_id: str | None = (payload.get("data") or {}).get("custom_id")
        self.channel: JSON = channel
        self.user: JSON = user
        self.created_at: float = time.monotonic()
        self.acked_at: float | None = None
        self.responses: list[JSON] = []
        self.followups: list[JSON] = []
        self.original: JSON | None = None
        self.modal: JSON | None = None
        self.errors: list[str] = []  # requests the fake rejected (late ack, double ack ...)
        self._deferred_pending = False  # type 5 sent, nothing visible yet

    @property
    def label(self) -> str:
        """``/name`` for a command, ``button:custom_id`` for a button press."""
        if self.command is not None:
            return f"/{self.command['name']}"
        return f"button:{self.custom_id}"

    def __repr__(self) -> str:
        return f"<Interaction {self.label} id={self.id} done={self.done} content={self.content!r}>"

    @property
    def latency(self) -> float | None:
        """Seconds between dispatching the interaction and the bot's callback."""
        return None if self.acked_at is None else self.acked_at - self.created_at

    @property
    def response_types(self) -> list[int]:
        """Callback types the bot used (4 message, 5 deferred, 6 deferred update, 7 update, 9 modal)."""
        return [r.get("type") for r in self.responses]

    @property
    def deferred(self) -> bool:
        """Acknowledged with type 5 ("thinking") or 6 (deferred update of the button's message)."""
        return any(t in (5, 6) for t in self.response_types)

    @property
    def visible_messages(self) -> list[JSON]:
        """Messages the user can see, original first (a pending "thinking" one excluded)."""
        out: list[JSON] = []
        if self.original is not None and not self.original.get("flags", 0) & FLAG_LOADING:
            out.append(self.original)
        out.extend(m for m in self.followups if m is not self.original and not m.get("_deleted"))
        return out

    @property
    def done(self) -> bool:
        """A visible answer exists (type 4, 5 + edit/followup, 6/7 on a button) or a modal was shown."""
        return bool(self.visible_messages) or self.modal is not None

    @property
    def content(self) -> str:
        """Final visible text: the contents of :attr:`visible_messages` joined with newlines."""
        return "\n".join(m.get("content") or "" for m in self.visible_messages)

    @property
    def embeds(self) -> list[JSON]:
        """Embeds of :attr:`visible_messages`, in order."""
        return [copy.deepcopy(e) for m in self.visible_messages for e in m.get("embeds") or []]

    @property
    def files(self) -> list[tuple[str, bytes]]:
        """``(filename, data)`` of every attachment of :attr:`visible_messages`, in order."""
        return [self._fake.attachment_data(a) for m in self.visible_messages for a in m.get("attachments") or []]

    @property
    def ephemeral(self) -> bool:
        """Whether the first answer (the original response) is ephemeral."""
        first = self.original or (self.followups[0] if self.followups else None)
        if first is None:
            return bool(self.responses and (self.responses[0].get("data") or {}).get("flags", 0) & FLAG_EPHEMERAL)
        return bool(first.get("flags", 0) & FLAG_EPHEMERAL)

    async def wait_done(self, timeout: float = 30.0) -> Interaction:
        await self._fake.wait_for(lambda: self.done, timeout, description=f"interaction {self!r} answered")
        return self


# --------------------------------------------------------------------------- the fake


class FakeDiscord:
    """Fake Discord REST API + gateway.  See the module docstring."""

    def __init__(self, *, shard_count: int = 1, heartbeat_interval_ms: int = 41250) -> None:
        self.shard_count = shard_count
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.token: str = "fake." + secrets.token_urlsafe(24)
        self.api_base: str = ""
        self.gateway_url: str = ""
        self.base_url: str = ""
        # Knobs tests may flip.
        self.refuse_privileged_intents: bool = False
        self.interaction_ack_timeout: float = 3.0
        # (edits, seconds): PATCHes of channel messages beyond this many per channel per
        # window get a 429 (None: no limit).  See max_edits_in_window.
        self.edit_rate_limit: tuple[int, float] | None = None
        # While set, attachment downloads wait for it (a slow CDN); None: served at once.
        self.hold_attachments: asyncio.Event | None = None
        # Observations.
        self.requests: list[JSON] = []
        self.unknown_routes: list[str] = []
        self.typing: list[tuple[str, float]] = []
        self.reactions: dict[tuple[str, str], list[str]] = {}
        self.commands: dict[str, list[JSON]] = {}
        self.events: list[JSON] = []  # every gateway frame sent (dispatches + control ops)
        self.typing_events: list[JSON] = []  # every TYPING_START a test started (see start_typing)
        self.presences: list[JSON] = []  # op 3 payloads received
        self.identify_payloads: list[JSON] = []
        self.identify_count = 0
        self.resume_count = 0
        self.injected_failures = 0
        self.attachment_downloads = 0  # GETs of attachment URLs begun
        self.interactions: list[Interaction] = []
        # Every message edit: {"time", "channel_id", "message_id", "editor_id", "via"}, via one of
        # "rest" (PATCH /channels/../messages/..), "webhook" (PATCH of an interaction message),
        # "update" (type 7 callback) or "user" (edit_message).
        self.edit_log: list[JSON] = []

        self._last_ts = 0
        self._increment = 0
        self._users: dict[str, JSON] = {}
        self._guilds: dict[str, JSON] = {}
        self._roles: dict[str, list[JSON]] = {}
        self._members: dict[str, dict[str, JSON]] = {}
        self._channels: dict[str, JSON] = {}
        self._dms: dict[str, str] = {}  # user id -> dm channel id
        self._messages: dict[str, list[JSON]] = {}
        self._message_index: dict[str, JSON] = {}
        self._reaction_users: dict[str, dict[str, list[str]]] = {}  # message id -> emoji -> user ids
        self._files: dict[str, tuple[str, bytes]] = {}  # attachment id -> (content type, data)
        self._command_ids: dict[tuple[str, str, int], str] = {}
        # (guild id, command name) -> {user or role id (the guild id: @everyone): allowed}
        self._command_overrides: dict[tuple[str, str], dict[str, bool]] = {}
        self._interactions_by_id: dict[str, Interaction] = {}
        self._interactions_by_token: dict[str, Interaction] = {}
        self._failures: list[_FailureRule] = []
        self._sessions: dict[str, _Session] = {}
        self._open: set[_Connection] = set()
        self._outbox: collections.deque[_Event] = collections.deque()
        self._world_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wakeup: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._routes = self._build_routes()

        self.application_id = int(self._next_id())
        self.app_owner: JSON = self._make_user("app-owner")
        self.bot_user: JSON = {
            **self._make_user("FakeBot", bot=True),
            "discriminator": "0001",
            "verified": True,
            "mfa_enabled": False,
            "flags": 0,
            "email": None,
            "locale": "en-US",
        }
        self.bot_user["id"] = str(self.application_id)  # like real bots: user id == application id
        self._users[self.bot_user["id"]] = self.bot_user

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Serve on 127.0.0.1 with a random free port."""
        self._world_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", f"/api/v{API_VERSION}/{{tail:.*}}", self._handle_rest)
        app.router.add_get("/gateway", self._handle_gateway)
        app.router.add_get("/attachments/{channel}/{attachment}/{filename}", self._handle_attachment)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.api_base = f"{self.base_url}/api/v{API_VERSION}"
        self.gateway_url = f"ws://127.0.0.1:{port}/gateway"

    async def close(self) -> None:
        """Close every websocket, finish pending event flushes and stop the server."""
        for conn in list(self._open):
            conn.server_close_code = 1001
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"fake discord shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Point discord.py's REST base and default gateway at this fake (restored on exit)."""
        import discord.gateway
        import discord.http
        import yarl

        old = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old

    @contextlib.asynccontextmanager
    async def running(self, client: Any, *, timeout: float = 30.0) -> AsyncIterator[asyncio.Task[None]]:
        """Run ``client.start(token)`` against the fake until the client is ready.

        Yields the client's task.  On exit the client is closed and its task
        awaited; an exception from ``client.start`` (e.g. PrivilegedIntentsRequired)
        propagates, also during the ready wait (an exception of the ``async with``
        body itself takes precedence).  discord.py's module globals are patched for
        the duration, so only one fake can be "running" per process at a time.
        """
        with self.patched():
            task: asyncio.Task[None] = asyncio.ensure_future(client.start(self.token))
            try:
                await self.wait_for(lambda: task.done() or client.is_ready(), timeout, description="client ready")
                if task.done():
                    task.result()  # raises the client's error
                    raise RuntimeError("client.start() returned before the client became ready")
                await self.wait_ready(timeout)
                yield task
            finally:
                await client.close()
                if not task.done():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(task), 10)
            # Only reached when the body succeeded: surface a crash of the client itself.
            if task.done() and not task.cancelled():
                task.result()

    # ------------------------------------------------------------------ ids and waiting

    def _next_id(self, *, shard: int | None = None) -> str:
        """A fresh, increasing snowflake; with ``shard`` it lands on that shard."""
        ts = max(int(time.time() * 1000) - DISCORD_EPOCH_MS, self._last_ts)
        if ts == self._last_ts:
            self._increment += 1
            if self._increment >= 4096:
                ts, self._increment = ts + 1, 0
        else:
            self._increment = 0
        if shard is not None:
            while ts % self.shard_count != shard:
                ts, self._increment = ts + 1, 0
        self._last_ts = ts
        return str((ts << 22) | (1 << 17) | self._increment)

    def _notify(self) -> None:
        """Wake up :meth:`wait_for` pollers."""
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = asyncio.Event()

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 30.0, *, description: str | None = None
    ) -> Any:
        """Poll ``predicate`` (every 20 ms, or sooner when the fake sees activity) until truthy; return it."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                recent = [f"{r['method']} {r['path']} -> {r.get('status')}" for r in self.requests[-8:]]
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {description or getattr(predicate, '__name__', predicate)}"
                    f" (last value {value!r}); open gateway connections={self.connections},"
                    f" identifies={self.identify_count}, resumes={self.resume_count},"
                    f" recent REST calls={recent}, unknown routes={self.unknown_routes}"
                )
            wakeup = self._wakeup
            if wakeup is None:
                await asyncio.sleep(min(0.02, remaining))
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), min(0.02, remaining))

    async def wait_for_bot_message(
        self, channel: ChannelRef, *, count: int = 1, after: JSON | None = None, timeout: float = 60.0
    ) -> list[JSON]:
        """Wait until the channel holds at least ``count`` bot messages; return them (oldest first).

        Counted are the bot's messages *currently* in the channel (deleted ones
        drop out), excluding interaction "thinking" placeholders.  With
        ``after`` (any message dict, typically the user message that triggered
        the bot) only messages newer than it count: that is the race-free way to
        wait for "the reply to this message".
        """
        floor = int(after["id"]) if after is not None else -1

        def ready() -> list[JSON] | None:
            found = [
                m for m in self.bot_messages(channel) if int(m["id"]) > floor and not m.get("flags", 0) & FLAG_LOADING
            ]
            return found if len(found) >= count else None

        return await self.wait_for(ready, timeout, description=f"{count} bot message(s) in channel {_cid(channel)}")

    # ------------------------------------------------------------------ gateway info

    @property
    def connections(self) -> int:
        """Number of open gateway websockets."""
        return len(self._open)

    def _is_ready(self) -> bool:
        ready = [s for s in self._sessions.values() if s.alive and s.ready and s.ws is not None and not s.ws.closed]
        if any(s.shard is None for s in ready):
            return True
        by_count: dict[int, set[int]] = collections.defaultdict(set)
        for s in ready:
            assert s.shard is not None
            by_count[s.shard[1]].add(s.shard[0])
        return any(ids == set(range(count)) for count, ids in by_count.items())

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until connected sessions covering all shards were sent READY and their GUILD_CREATEs.

        Note the client itself fires ``on_ready`` only ``guild_ready_timeout``
        seconds later; use ``client.wait_until_ready()`` (or :meth:`running`)
        when the client's cache matters.
        """
        await self.wait_for(self._is_ready, timeout, description="gateway sessions ready")

    # ------------------------------------------------------------------ world building

    def _make_user(self, name: str, *, bot: bool = False, global_name: str | None = None) -> JSON:
        user: JSON = {
            "id": self._next_id(),
            "username": name,
            "discriminator": "0",
            "global_name": global_name,
            "avatar": None,
            "bot": bot,
            "system": False,
            "public_flags": 0,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
        }
        self._users[user["id"]] = user
        return user

    def add_user(self, name: str, *, bot: bool = False, global_name: str | None = None) -> JSON:
        """A Discord user (not yet member of any guild)."""
        return self._make_user(name, bot=bot, global_name=global_name)

    def add_guild(self, name: str, *, owner: JSON | None = None, shard: int | None = None, with_bot: bool = True) -> JSON:
        """A guild with an ``@everyone`` role (id == guild id) and the bot as member.

        ``owner`` defaults to a fresh user "<name>-owner".  ``shard`` picks the
        guild id so that ``(id >> 22) % shard_count == shard``.  ``with_bot=False``:
        the bot has not been invited yet (see :meth:`invite_bot`); the gateway tells it
        nothing of the guild, and Discord refuses its command syncs there (403 Missing Access).
        """
        if shard is not None and not 0 <= shard < self.shard_count:
            raise ValueError(f"shard {shard} out of range for shard_count={self.shard_count}")
        guild_id = self._next_id(shard=shard)
        owner = owner or self._make_user(f"{name}-owner")
        guild: JSON = {
            "id": guild_id,
            "name": name,
            "owner_id": owner["id"],
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "features": [],
            "emojis": [],
            "stickers": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "afk_timeout": 300,
            "afk_channel_id": None,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "application_id": None,
            "widget_enabled": False,
            "max_members": 500000,
            "nsfw": False,
            "incidents_data": None,
        }
        self._guilds[guild_id] = guild
        self._roles[guild_id] = [self._role_payload(guild_id, "@everyone", Permissions.DEFAULT_EVERYONE, 0)]
        self._members[guild_id] = {}
        self._put_member(guild_id, owner, [], None)
        if with_bot:
            self._put_member(guild_id, self.bot_user, [], None)
            self._emit_later(_Event("GUILD_CREATE", {}, guild_id, None))  # payload built per session at flush
        return guild

    def bot_in(self, guild_id: str) -> bool:
        return self.bot_user["id"] in self._members.get(guild_id, {})

    async def invite_bot(self, guild: JSON) -> None:
        """The bot joins a guild (an admin used its invite link): GUILD_CREATE, as on a join."""
        self._put_member(guild["id"], self.bot_user, [], None)
        await self._emit(_Event("GUILD_CREATE", {"joined": True}, guild["id"], None))

    def _role_payload(self, role_id: str, name: str, permissions: int, position: int) -> JSON:
        return {
            "id": role_id,
            "name": name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": position,
            "permissions": str(permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    def add_role(self, guild: JSON, name: str, *, permissions: int = 0) -> JSON:
        gid = _cid(guild)
        roles = self._roles[gid]
        role = self._role_payload(self._next_id(), name, permissions, len(roles))
        roles.append(role)
        self._emit_later(_Event("GUILD_ROLE_CREATE", {"guild_id": gid, "role": role}, gid, Intents.GUILDS))
        return role

    def set_role_permissions(self, guild: JSON, role: ChannelRef, permissions: int) -> JSON:
        """Give a role new permissions (GUILD_ROLE_UPDATE); ``role`` may be the guild itself for @everyone."""
        gid = _cid(guild)
        found = next(r for r in self._roles[gid] if r["id"] == _cid(role))
        found["permissions"] = str(permissions)
        data = {"guild_id": gid, "role": copy.deepcopy(found)}
        self._emit_later(_Event("GUILD_ROLE_UPDATE", data, gid, Intents.GUILDS))
        return found

    def _put_member(self, gid: str, user: JSON, roles: Iterable[JSON], nick: str | None) -> tuple[JSON, bool]:
        members = self._members[gid]
        existing = members.get(user["id"])
        member = {
            "user": self._user_public(user),
            "roles": [_cid(r) for r in roles],
            "nick": nick,
            "avatar": None,
            "banner": None,
            "joined_at": existing["joined_at"] if existing else _now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        members[user["id"]] = member
        return member, existing is not None

    def add_member(self, guild: JSON, user: JSON, *, roles: Iterable[JSON] = (), nick: str | None = None) -> JSON:
        """Make ``user`` a guild member (or replace roles/nick of an existing one, e.g. the bot)."""
        gid = _cid(guild)
        member, existed = self._put_member(gid, user, roles, nick)
        name = "GUILD_MEMBER_UPDATE" if existed else "GUILD_MEMBER_ADD"
        # Discord sends updates of the bot's own member even without the GUILD_MEMBERS intent.
        own_update = existed and user["id"] == self.bot_user["id"]
        intent = None if own_update else Intents.GUILD_MEMBERS
        self._emit_later(_Event(name, {**member, "guild_id": gid}, gid, intent))
        return member

    def add_channel(
        self, guild: JSON, name: str, *, type: int = CH_TEXT, parent_id: str | None = None, topic: str | None = None
    ) -> JSON:
        """A guild channel; type 11/12 make a thread (``parent_id`` required) and type 2 a voice channel.

        A thread made here is owned by the guild owner; :meth:`start_thread` makes
        one as a given user (optionally from a message).
        """
        gid = _cid(guild)
        if type in CH_THREAD_TYPES:
            if parent_id is None:
                raise ValueError("a thread needs parent_id")
            return self._make_thread(self._channels[parent_id], name, type=type, owner_id=self._guilds[gid]["owner_id"])
        position = sum(1 for c in self._channels.values() if c.get("guild_id") == gid)
        channel: JSON = {
            "id": self._next_id(),
            "type": type,
            "guild_id": gid,
            "name": name,
            "position": position,
            "permission_overwrites": [],
            "parent_id": parent_id,
            "nsfw": False,
            "flags": 0,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        if type in (CH_TEXT, CH_NEWS):
            channel["topic"] = topic
        if type == CH_VOICE:
            channel.update(bitrate=64000, user_limit=0, rtc_region=None)
        self._channels[channel["id"]] = channel
        self._messages[channel["id"]] = []
        self._emit_later(_Event("CHANNEL_CREATE", dict(channel), gid, Intents.GUILDS))
        return channel

    def _make_thread(
        self,
        parent: JSON,
        name: str,
        *,
        type: int,
        owner_id: str,
        thread_id: str | None = None,
        auto_archive_duration: int = 1440,
        rate_limit_per_user: int = 0,
        invitable: bool = True,
    ) -> JSON:
        """Store a thread channel under ``parent`` and queue THREAD_CREATE (``newly_created``).

        The payload is shaped like Discord's thread channel object; stored messages
        keep ``message_count`` / ``total_message_sent`` / ``last_message_id`` current.
        """
        gid = parent["guild_id"]
        now = _now_iso()
        metadata: JSON = {
            "archived": False,
            "auto_archive_duration": auto_archive_duration,
            "archive_timestamp": now,
            "locked": False,
            "create_timestamp": now,
        }
        if type == CH_PRIVATE_THREAD:
            metadata["invitable"] = invitable
        thread: JSON = {
            "id": thread_id or self._next_id(),
            "type": type,
            "guild_id": gid,
            "name": name,
            "parent_id": parent["id"],
            "owner_id": owner_id,
            "nsfw": bool(parent.get("nsfw", False)),
            "flags": 0,
            "last_message_id": None,
            "rate_limit_per_user": rate_limit_per_user,
            "message_count": 0,
            "member_count": 1,
            "total_message_sent": 0,
            "thread_metadata": metadata,
        }
        self._channels[thread["id"]] = thread
        self._messages[thread["id"]] = []
        self._emit_later(_Event("THREAD_CREATE", {**_public(thread), "newly_created": True}, gid, Intents.GUILDS))
        return thread

    def dm_channel(self, user: JSON) -> JSON:
        """The DM channel between ``user`` and the bot (created on first use)."""
        channel_id = self._dms.get(user["id"])
        if channel_id is None:
            channel_id = self._next_id()
            self._channels[channel_id] = {
                "id": channel_id,
                "type": CH_DM,
                "recipients": [self._user_public(user)],
                "last_message_id": None,
                "flags": 0,
            }
            self._messages[channel_id] = []
            self._dms[user["id"]] = channel_id
        return self._channels[channel_id]

    def channel(self, channel_id: ChannelRef) -> JSON:
        return self._channels[_cid(channel_id)]

    def guild_members(self, guild: JSON) -> dict[str, JSON]:
        return self._members[_cid(guild)]

    # ------------------------------------------------------------------ observation

    def messages(self, channel: ChannelRef) -> list[JSON]:
        """Current messages in the channel (after edits/deletes), oldest first.  Live dicts: don't mutate."""
        return list(self._messages.get(_cid(channel), []))

    def bot_messages(self, channel: ChannelRef) -> list[JSON]:
        """:meth:`messages` authored by the bot (incl. non-ephemeral interaction responses)."""
        return [m for m in self.messages(channel) if m["author"]["id"] == self.bot_user["id"]]

    def message(self, message_id: str | int) -> JSON | None:
        return self._message_index.get(str(message_id))

    def threads_of(self, channel: ChannelRef) -> list[JSON]:
        """Threads whose parent is ``channel``, oldest first.  Live dicts: don't mutate."""
        cid = _cid(channel)
        threads = [c for c in self._channels.values() if c["type"] in CH_THREAD_TYPES and c.get("parent_id") == cid]
        return sorted(threads, key=lambda c: int(c["id"]))

    def attachment_data(self, attachment: JSON) -> tuple[str, bytes]:
        """``(filename, bytes)`` of a stored attachment payload (what its ``url`` serves)."""
        _, data = self._files[attachment["id"]]
        return attachment["filename"], data

    def max_edits_in_window(self, channel: ChannelRef, seconds: float = 5.0, *, author: JSON | None = None) -> int:
        """Most message edits in ``channel`` within any sliding window of ``seconds``.

        Counts the edits made by the bot (REST PATCHes of channel messages, PATCHes of
        interaction messages, type 7 UPDATE_MESSAGE callbacks), or with ``author`` the
        edits that user made through :meth:`edit_message`.  Rejected requests (429,
        400 ...) are not edits.  Times are those recorded when the fake applied each edit.
        """
        cid = _cid(channel)
        editor = (author or self.bot_user)["id"]
        times = sorted(e["time"] for e in self.edit_log if e["channel_id"] == cid and e["editor_id"] == editor)
        best = start = 0
        for end, t in enumerate(times):
            while t - times[start] >= seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    def requests_to(self, method: str, path_regex: str) -> list[JSON]:
        """Recorded REST requests whose method matches and path matches ``re.search(path_regex)``."""
        pattern = re.compile(path_regex)
        return [r for r in self.requests if r["method"] == method.upper() and pattern.search(r["path"])]

    # ------------------------------------------------------------------ permissions

    def permissions_of(self, guild: JSON, user: JSON) -> int:
        """Guild-level permissions of a member (owner/administrator -> everything)."""
        gid, uid = _cid(guild), user["id"]
        if self._guilds[gid]["owner_id"] == uid:
            return Permissions.ALL
        member = self._members[gid].get(uid)
        roles = {r["id"]: int(r["permissions"]) for r in self._roles[gid]}
        perms = roles[gid]
        for role_id in member["roles"] if member else []:
            perms |= roles.get(role_id, 0)
        return Permissions.ALL if perms & Permissions.ADMINISTRATOR else perms

    def _bot_can(self, channel: JSON, permission: int) -> bool:
        """Whether the bot has every bit of ``permission`` in ``channel`` (guild-level)."""
        gid = channel.get("guild_id")
        if gid is None:
            return not permission & Permissions.MANAGE_MESSAGES
        return self.permissions_of(self._guilds[gid], self.bot_user) & permission == permission

    # ------------------------------------------------------------------ gateway event plumbing

    def _emit_later(self, event: _Event) -> None:
        """Queue a gateway event and schedule a flush (no-op before :meth:`start`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._world_lock is None:
            return
        self._outbox.append(event)
        task = loop.create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emit(self, event: _Event) -> None:
        self._emit_later(event)
        await self.flush()

    async def flush(self) -> None:
        """Deliver every queued gateway event (world-building methods queue them)."""
        if self._world_lock is None:
            return
        async with self._world_lock:
            await self._flush_locked()
        self._notify()

    async def _flush_locked(self) -> None:
        while self._outbox:
            event = self._outbox.popleft()
            for session in list(self._sessions.values()):
                if not session.alive:
                    continue
                if event.guild_id is None:
                    if session.shard_id != 0:
                        continue
                elif not session.covers_guild(event.guild_id) or not self.bot_in(event.guild_id):
                    continue
                if event.intent is not None and not session.intents & event.intent:
                    continue
                if event.name == "GUILD_CREATE":
                    data = self._guild_create_payload(event.guild_id or "", session)
                    if event.data.get("joined"):  # a join, not a guild becoming available: Discord sends no "unavailable"
                        del data["unavailable"]
                elif event.strip_content:
                    data = self._content_for(session, event.data)
                else:
                    data = event.data
                await self._send_dispatch(session, event.name, data)

    def _content_for(self, session: _Session, message: JSON) -> JSON:
        """Apply Discord's MESSAGE_CONTENT rule for a session lacking that intent."""
        if session.intents & Intents.MESSAGE_CONTENT or not message.get("guild_id"):
            return message
        bot_id = self.bot_user["id"]
        if message.get("author", {}).get("id") == bot_id or any(u["id"] == bot_id for u in message.get("mentions", [])):
            return message
        stripped = dict(message, content="", embeds=[], attachments=[], components=[])
        stripped.pop("poll", None)
        return stripped

    async def _send_frame(self, conn_ws: web.WebSocketResponse | None, frame: JSON, session: _Session | None) -> str:
        text = json.dumps(frame)
        self.events.append(
            {
                "time": time.monotonic(),
                "op": frame["op"],
                "t": frame.get("t"),
                "s": frame.get("s"),
                "d": json.loads(text)["d"],
                "session_id": session.session_id if session else None,
                "shard": list(session.shard) if session and session.shard else None,
            }
        )
        if conn_ws is not None and not conn_ws.closed:
            # If the client went away mid-send, a RESUME replays this frame from the buffer.
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn_ws.send_str(text)
        return text

    async def _send_dispatch(self, session: _Session, name: str, data: JSON) -> None:
        async with session.lock:
            session.seq += 1
            frame = {"op": 0, "t": name, "s": session.seq, "d": data}
            text = await self._send_frame(session.ws, frame, session)
            session.buffer.append((session.seq, text))

    async def _send_op(self, conn: _Connection, op: int, d: Any) -> None:
        await self._send_frame(conn.ws, {"op": op, "d": d, "s": None, "t": None}, conn.session)

    def _guild_create_payload(self, guild_id: str, session: _Session) -> JSON:
        members = self._members[guild_id]
        # Like Discord: without GUILD_MEMBERS only the bot's own member is sent.
        all_members = session.intents & Intents.GUILD_MEMBERS
        visible = list(members.values()) if all_members else [members[self.bot_user["id"]]]
        channels = [c for c in self._channels.values() if c.get("guild_id") == guild_id]
        return {
            **copy.deepcopy(self._guilds[guild_id]),
            "unavailable": False,
            "large": False,
            "lazy": True,
            "joined_at": members[self.bot_user["id"]]["joined_at"],
            "member_count": len(members),
            "roles": copy.deepcopy(self._roles[guild_id]),
            "members": copy.deepcopy(visible),
            "channels": [copy.deepcopy(c) for c in channels if c["type"] not in CH_THREAD_TYPES],
            "threads": [copy.deepcopy(c) for c in channels if c["type"] in CH_THREAD_TYPES],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    # ------------------------------------------------------------------ gateway websocket

    async def _handle_gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=2.0, max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws=ws, request=request)
        self._open.add(conn)
        self._notify()
        try:
            await self._send_op(
                conn, 10, {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["fake-gateway"]}
            )
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    await self._close(conn, 4002, "Error while decoding payload.")
                    break
                await self._on_gateway_frame(conn, frame)
        finally:
            self._open.discard(conn)
            session = conn.session
            if session is not None and session.ws is ws:
                session.ws = None
                code = conn.server_close_code if conn.server_close_code is not None else ws.close_code
                # A clean client close ends the session; Discord-side closes 4007/4009 invalidate it.
                if (conn.server_close_code is None and code in (1000, 1001)) or code in (4007, 4009):
                    self._drop_session(session)
            self._notify()
        return ws

    async def _close(self, conn: _Connection, code: int, reason: str) -> None:
        conn.server_close_code = code
        await conn.ws.close(code=code, message=reason.encode())

    def _drop_session(self, session: _Session) -> None:
        session.alive = False
        self._sessions.pop(session.session_id, None)

    async def _on_gateway_frame(self, conn: _Connection, frame: JSON) -> None:
        op, d = frame.get("op"), frame.get("d")
        if op == 1:
            await self._send_op(conn, 11, None)
        elif op == 2:
            await self._on_identify(conn, d or {})
        elif op == 6:
            await self._on_resume(conn, d or {})
        elif conn.session is None and op in (3, 4, 8):
            await self._close(conn, 4003, "Not authenticated.")
        elif op == 3:
            self.presences.append(d or {})
        elif op == 4:
            pass  # voice state update: no voice in the fake
        elif op == 8:
            await self._on_request_members(conn, d or {})
        else:
            await self._close(conn, 4001, "Unknown opcode.")

    async def _on_identify(self, conn: _Connection, d: JSON) -> None:
        if conn.session is not None:
            await self._close(conn, 4005, "Already authenticated.")
            return
        if d.get("token") != self.token:
            await self._close(conn, 4004, "Authentication failed.")
            return
        intents = d.get("intents")
        if not isinstance(intents, int):
            await self._close(conn, 4013, "Invalid intent(s).")
            return
        if self.refuse_privileged_intents and intents & Intents.PRIVILEGED:
            await self._close(conn, 4014, "Disallowed intent(s).")
            return
        shard: tuple[int, int] | None = None
        if d.get("shard") is not None:
            shard_id, count = d["shard"]
            if not (0 <= shard_id < count):
                await self._close(conn, 4010, "Invalid shard.")
                return
            shard = (int(shard_id), int(count))
        self.identify_count += 1
        self.identify_payloads.append(d)
        assert self._world_lock is not None
        async with self._world_lock:
            await self._flush_locked()
            # The same shard identifying again abandons its old (detached) session.
            for old in list(self._sessions.values()):
                if old.shard == shard and old.ws is None:
                    self._drop_session(old)
            session = _Session(session_id=secrets.token_hex(16), shard=shard, intents=intents, ws=conn.ws)
            conn.session = session
            guild_ids = [gid for gid in self._guilds if session.covers_guild(gid) and self.bot_in(gid)]
            ready: JSON = {
                "v": API_VERSION,
                "user": copy.deepcopy(self.bot_user),
                "guilds": [{"id": gid, "unavailable": True} for gid in guild_ids],
                "session_id": session.session_id,
                "session_type": "normal",
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(self.application_id), "flags": self._application_flags()},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": ["fake"],
                "user_settings": {},
                "auth": {},
                "_trace": ["fake-gateway"],
            }
            if shard is not None:
                ready["shard"] = list(shard)
            await self._send_dispatch(session, "READY", ready)
            for gid in guild_ids:
                await self._send_dispatch(session, "GUILD_CREATE", self._guild_create_payload(gid, session))
            session.ready = True
            self._sessions[session.session_id] = session
        self._notify()

    def _application_flags(self) -> int:
        # GATEWAY_*_LIMITED flags: the privileged intents are "enabled" unless refused.
        return 0 if self.refuse_privileged_intents else (1 << 13) | (1 << 15) | (1 << 19)

    async def _on_resume(self, conn: _Connection, d: JSON) -> None:
        session = self._sessions.get(str(d.get("session_id")))
        seq = d.get("seq") or 0
        if conn.session is not None:
            await self._close(conn, 4005, "Already authenticated.")
            return
        if session is None or not session.alive or d.get("token") != self.token:
            await self._send_op(conn, 9, False)
            return
        assert self._world_lock is not None
        async with self._world_lock:
            await self._flush_locked()
            async with session.lock:
                missed = [(s, text) for s, text in session.buffer if s > seq]
                lost = seq < session.seq and (not missed or missed[0][0] != seq + 1)
            if lost:  # the buffer no longer reaches back to the client's seq
                await self._send_op(conn, 9, False)
                self._drop_session(session)
                return
            self.resume_count += 1
            old_ws = session.ws
            session.ws = conn.ws
            conn.session = session
            if old_ws is not None and old_ws is not conn.ws and not old_ws.closed:
                task = asyncio.ensure_future(old_ws.close(code=4000))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            for _, text in missed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await conn.ws.send_str(text)
                frame = json.loads(text)
                self.events.append(
                    {
                        "time": time.monotonic(),
                        "op": 0,
                        "t": frame["t"],
                        "s": frame["s"],
                        "d": frame["d"],
                        "session_id": session.session_id,
                        "shard": list(session.shard) if session.shard else None,
                        "replay": True,
                    }
                )
            await self._send_dispatch(session, "RESUMED", {"_trace": ["fake-gateway"]})
        self._notify()

    async def _on_request_members(self, conn: _Connection, d: JSON) -> None:
        assert conn.session is not None
        gid = str(d.get("guild_id"))
        members = list(self._members.get(gid, {}).values())
        if d.get("user_ids"):
            wanted = {str(u) for u in d["user_ids"]}
            members = [m for m in members if m["user"]["id"] in wanted]
        elif d.get("query"):
            q = d["query"].lower()
            members = [m for m in members if m["user"]["username"].lower().startswith(q)]
        if d.get("limit"):
            members = members[: d["limit"]]
        chunk: JSON = {
            "guild_id": gid,
            "members": copy.deepcopy(members),
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if d.get("nonce") is not None:
            chunk["nonce"] = d["nonce"]
        if d.get("presences"):
            chunk["presences"] = []
        await self._send_dispatch(conn.session, "GUILD_MEMBERS_CHUNK", chunk)

    # ------------------------------------------------------------------ gateway faults

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT on every open websocket; discord.py closes and RESUMEs."""
        await self.flush()
        for conn in list(self._open):
            await self._send_op(conn, 7, None)

    async def drop_connections(self, *, code: int = 4000, abrupt: bool = False) -> None:
        """Close every gateway websocket with ``code`` (or kill the TCP connection when ``abrupt``).

        Sessions stay resumable, except for codes 4007/4009 which invalidate them
        (discord.py will try to RESUME, get op 9 and re-IDENTIFY).
        """
        await self.flush()
        for conn in list(self._open):
            conn.server_close_code = 1006 if abrupt else code
            if abrupt:
                transport = conn.request.transport
                if transport is not None:
                    transport.abort()
            else:
                with contextlib.suppress(Exception):
                    await conn.ws.close(code=code, message=b"fake discord dropped the connection")

    async def invalid_session(self, resumable: bool = False) -> None:
        """Send op 9 to every identified websocket; non-resumable invalidates the sessions."""
        await self.flush()
        for conn in list(self._open):
            if conn.session is None:
                continue
            if not resumable:
                self._drop_session(conn.session)
            await self._send_op(conn, 9, resumable)

    # ------------------------------------------------------------------ REST faults

    def fail_next(
        self, method: str, path_regex: str, status: int, *, times: int = 1, retry_after: float = 0.05
    ) -> None:
        """The next ``times`` REST calls matching (``re.search`` on the path below /api/v10) answer ``status``."""
        self._failures.append(_FailureRule(method.upper(), re.compile(path_regex), status, times, retry_after))

    def _injected_failure(self, method: str, path: str) -> web.Response | None:
        for rule in self._failures:
            if rule.remaining > 0 and rule.method == method and rule.pattern.search(path):
                rule.remaining -= 1
                self.injected_failures += 1
                if rule.status == 429:
                    return _rate_limited(rule.retry_after, limit=5)
                reasons = {
                    500: "Internal Server Error",
                    502: "Bad Gateway",
                    503: "Service Unavailable",
                    504: "Gateway Timeout",
                }
                return _error(rule.status, f"{rule.status}: {reasons.get(rule.status, 'Error')}")
        return None

    # ------------------------------------------------------------------ REST plumbing

    def _build_routes(self) -> list[_Route]:
        table: list[tuple[str, str, _Handler, bool]] = [
            ("GET", r"/users/@me", self._r_get_me, True),
            ("GET", r"/users/(\d+)", self._r_get_user, True),
            ("POST", r"/users/@me/channels", self._r_create_dm, True),
            ("GET", r"/oauth2/applications/@me", self._r_app_info, True),
            ("GET", r"/applications/@me", self._r_app_info, True),
            ("GET", r"/gateway", self._r_gateway, False),
            ("GET", r"/gateway/bot", self._r_gateway_bot, True),
            ("GET", r"/guilds/(\d+)", self._r_get_guild, True),
            ("GET", r"/guilds/(\d+)/channels", self._r_guild_channels, True),
            ("GET", r"/guilds/(\d+)/roles", self._r_guild_roles, True),
            ("GET", r"/guilds/(\d+)/members/(\d+)", self._r_guild_member, True),
            ("GET", r"/channels/(\d+)", self._r_get_channel, True),
            ("GET", r"/channels/(\d+)/messages", self._r_history, True),
            ("POST", r"/channels/(\d+)/messages", self._r_post_message, True),
            ("GET", r"/channels/(\d+)/messages/(\d+)", self._r_get_message, True),
            ("PATCH", r"/channels/(\d+)/messages/(\d+)", self._r_edit_message, True),
            ("DELETE", r"/channels/(\d+)/messages/(\d+)", self._r_delete_message, True),
            ("POST", r"/channels/(\d+)/typing", self._r_typing, True),
            ("POST", r"/channels/(\d+)/messages/(\d+)/threads", self._r_thread_from_message, True),
            ("POST", r"/channels/(\d+)/threads", self._r_thread_without_message, True),
            ("GET", r"/guilds/(\d+)/threads/active", self._r_active_threads, True),
            ("PUT", r"/channels/(\d+)/messages/(\d+)/reactions/([^/]+)/@me", self._r_add_reaction, True),
            ("DELETE", r"/channels/(\d+)/messages/(\d+)/reactions/([^/]+)/@me", self._r_remove_reaction, True),
            ("GET", r"/applications/(\d+)/commands", self._r_get_commands, True),
            ("PUT", r"/applications/(\d+)/commands", self._r_put_commands, True),
            ("POST", r"/applications/(\d+)/commands", self._r_post_command, True),
            ("DELETE", r"/applications/(\d+)/commands/(\d+)", self._r_delete_command, True),
            ("GET", r"/applications/(\d+)/guilds/(\d+)/commands", self._r_get_commands, True),
            ("PUT", r"/applications/(\d+)/guilds/(\d+)/commands", self._r_put_commands, True),
            ("POST", r"/applications/(\d+)/guilds/(\d+)/commands", self._r_post_command, True),
            ("DELETE", r"/applications/(\d+)/guilds/(\d+)/commands/(\d+)", self._r_delete_command, True),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", self._r_interaction_callback, False),
            ("POST", r"/webhooks/(\d+)/([^/]+)", self._r_followup, False),
            ("GET", r"/webhooks/(\d+)/([^/]+)/messages/(@original|\d+)", self._r_webhook_get, False),
            ("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/(@original|\d+)", self._r_webhook_edit, False),
            ("DELETE", r"/webhooks/(\d+)/([^/]+)/messages/(@original|\d+)", self._r_webhook_delete, False),
        ]
        return [_Route(m, re.compile(p), h, a) for m, p, h, a in table]

    async def _read_body(self, request: web.Request) -> tuple[Any, list[JSON]]:
        """JSON body, or ``payload_json`` + files of a multipart body."""
        files: list[JSON] = []
        if request.content_type.startswith("multipart/"):
            payload: Any = None
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    continue  # nested multipart: discord.py never sends one
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    data = await part.read()
                    files.append(
                        {
                            "field": part.name,
                            "filename": part.filename,
                            "content_type": part.headers.get("Content-Type"),
                            "size": len(data),
                            "data": bytes(data),
                        }
                    )
            return payload, files
        text = await request.text()
        if not text:
            return None, files
        try:
            return json.loads(text), files
        except ValueError:
            return text, files

    async def _handle_rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body, files = await self._read_body(request)
        record: JSON = {
            "method": request.method,
            "path": path,
            "query": dict(request.query),
            "json": body,
            "files": files,
            "time": time.monotonic(),
            "status": None,
        }
        self.requests.append(record)
        response = await self._route(request, path, _Call(request.method, path, request.query, body, files, record))
        record["status"] = response.status
        self._notify()
        return response

    async def _route(self, request: web.Request, path: str, call: _Call) -> web.Response:
        for route in self._routes:
            if route.method != request.method:
                continue
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if route.auth and request.headers.get("Authorization") != f"Bot {self.token}":
                return _error(401, "401: Unauthorized", 0)
            failure = self._injected_failure(request.method, path)
            if failure is not None:
                return failure
            return await route.handler(call, *match.groups())
        self.unknown_routes.append(f"{request.method} {path}")
        return _error(404, "404: Not Found", 0)

    async def _handle_attachment(self, request: web.Request) -> web.Response:
        stored = self._files.get(request.match_info["attachment"])
        if stored is None:
            return web.Response(status=404, text="not found")
        content_type, data = stored
        self.attachment_downloads += 1
        if self.hold_attachments is not None:
            await self.hold_attachments.wait()
        return web.Response(body=data, content_type=content_type or "application/octet-stream")

    # ------------------------------------------------------------------ REST: users, app, gateway, guilds

    def _user_public(self, user: JSON) -> JSON:
        keys = (
            "id",
            "username",
            "discriminator",
            "global_name",
            "avatar",
            "bot",
            "system",
            "public_flags",
            "banner",
            "accent_color",
            "avatar_decoration_data",
        )
        return {k: copy.deepcopy(user.get(k)) for k in keys if k in user}

    async def _r_get_me(self, call: _Call) -> web.Response:
        return _json(self.bot_user)

    async def _r_get_user(self, call: _Call, user_id: str) -> web.Response:
        user = self._users.get(user_id)
        return _json(self._user_public(user)) if user else _error(404, "Unknown User", 10013)

    async def _r_create_dm(self, call: _Call) -> web.Response:
        recipient = str((call.json or {}).get("recipient_id"))
        user = self._users.get(recipient)
        if user is None:
            return _invalid("recipient_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
        return _json(_public(self.dm_channel(user)))

    async def _r_app_info(self, call: _Call) -> web.Response:
        return _json(
            {
                "id": str(self.application_id),
                "name": self.bot_user["username"],
                "icon": None,
                "description": "fake application",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "owner": self._user_public(self.app_owner),
                "team": None,
                "flags": self._application_flags(),
                "tags": [],
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "install_params": None,
                "integration_types_config": {"0": {}},
                "bot": self._user_public(self.bot_user),
            }
        )

    async def _r_gateway(self, call: _Call) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _r_gateway_bot(self, call: _Call) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": self.shard_count,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1},
            }
        )

    async def _r_get_guild(self, call: _Call, guild_id: str) -> web.Response:
        guild = self._guilds.get(guild_id)
        if guild is None:
            return _error(404, "Unknown Guild", 10004)
        return _json({**guild, "roles": self._roles[guild_id]})

    async def _r_guild_channels(self, call: _Call, guild_id: str) -> web.Response:
        if guild_id not in self._guilds:
            return _error(404, "Unknown Guild", 10004)
        return _json(
            [c for c in self._channels.values() if c.get("guild_id") == guild_id and c["type"] not in CH_THREAD_TYPES]
        )

    async def _r_guild_roles(self, call: _Call, guild_id: str) -> web.Response:
        if guild_id not in self._guilds:
            return _error(404, "Unknown Guild", 10004)
        return _json(self._roles[guild_id])

    async def _r_guild_member(self, call: _Call, guild_id: str, user_id: str) -> web.Response:
        member = self._members.get(guild_id, {}).get(user_id)
        return _json(member) if member else _error(404, "Unknown Member", 10007)

    async def _r_get_channel(self, call: _Call, channel_id: str) -> web.Response:
        channel = self._channels.get(channel_id)
        return _json(_public(channel)) if channel else _error(404, "Unknown Channel", 10003)

    # ------------------------------------------------------------------ messages: building

    def _mention_users(self, channel: JSON, user_ids: Iterable[str]) -> list[JSON]:
        """Mention payloads (user + partial member in guilds), deduplicated, known users only."""
        out: list[JSON] = []
        seen: set[str] = set()
        gid = channel.get("guild_id")
        for uid in user_ids:
            if uid in seen or uid not in self._users:
                continue
            seen.add(uid)
            entry = self._user_public(self._users[uid])
            member = self._members.get(gid, {}).get(uid) if gid else None
            if member is not None:
                entry["member"] = {k: copy.deepcopy(v) for k, v in member.items() if k != "user"}
            out.append(entry)
        return out

    def _resolve_mentions(
        self,
        channel: JSON,
        content: str,
        allowed: JSON | None,
        *,
        reply_author: str | None = None,
        extra_users: Iterable[str] = (),
    ) -> tuple[list[JSON], list[str], bool, list[str]]:
        """Apply Discord's allowed_mentions rules.

        Returns ``(mentions, mention_roles, mention_everyone, pinged)``.
        ``allowed=None`` means the field was absent: Discord then parses
        everything and pings the replied-to author.
        """
        if allowed is None:
            allowed = {"parse": ["users", "roles", "everyone"], "replied_user": True}
        parse = set(allowed.get("parse") or [])
        allowed_users = {str(u) for u in allowed.get("users") or []}
        allowed_roles = {str(r) for r in allowed.get("roles") or []}
        gid = channel.get("guild_id")

        content_users = _MENTION_USER_RE.findall(content) + [str(u) for u in extra_users]
        users = [u for u in content_users if "users" in parse or u in allowed_users]
        if reply_author is not None and allowed.get("replied_user", False):
            users.append(reply_author)
        mentions = self._mention_users(channel, users)

        roles: list[str] = []
        if gid:
            guild_roles = {r["id"] for r in self._roles[gid]}
            for role_id in _MENTION_ROLE_RE.findall(content):
                if role_id in guild_roles and ("roles" in parse or role_id in allowed_roles) and role_id not in roles:
                    roles.append(role_id)
        everyone = bool(gid) and "everyone" in parse and bool(_MENTION_EVERYONE_RE.search(content))
        pinged = [m["id"] for m in mentions] + roles + (["everyone"] if everyone else [])
        return mentions, roles, everyone, pinged

    def _validate_allowed_mentions(self, allowed: Any) -> web.Response | None:
        if allowed is None:
            return None
        parse = set(allowed.get("parse") or [])
        bad = parse - {"users", "roles", "everyone"}
        if bad:
            message = f"Value must be one of roles, users, everyone: {sorted(bad)}"
            return _invalid("allowed_mentions.parse", "BASE_TYPE_CHOICES", message)
        for kind in ("users", "roles"):
            if kind in parse and allowed.get(kind):
                message = f'parse:["{kind}"] and {kind}: [ids...] are mutually exclusive.'
                return _invalid("allowed_mentions", "MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE", message)
        return None

    def _validate_message(self, payload: JSON, *, has_files: bool, existing: JSON | None = None) -> web.Response | None:
        """The length/shape checks Discord applies; ``existing`` is the message being edited."""
        content = payload.get("content")
        if content is not None and len(str(content)) > 2000:
            return _invalid("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
        embeds = payload.get("embeds")
        if embeds is not None:
            if len(embeds) > 10:
                return _invalid("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
            total = 0
            limits = {"title": 256, "description": 4096}
            for i, embed in enumerate(embeds):
                for key, limit in limits.items():
                    value = embed.get(key) or ""
                    total += len(value)
                    if len(value) > limit:
                        return _invalid(
                            f"embeds.{i}.{key}", "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length."
                        )
                fields = embed.get("fields") or []
                if len(fields) > 25:
                    return _invalid(f"embeds.{i}.fields", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
                for j, f in enumerate(fields):
                    if not f.get("name") or len(f["name"]) > 256 or not f.get("value") or len(f["value"]) > 1024:
                        message = "Embed field name must be 1-256 and value 1-1024 long."
                        return _invalid(f"embeds.{i}.fields.{j}", "BASE_TYPE_BAD_LENGTH", message)
                    total += len(f["name"]) + len(f["value"])
                total += len((embed.get("footer") or {}).get("text") or "") + len(
                    (embed.get("author") or {}).get("name") or ""
                )
            if total > 6000:
                return _invalid("embeds", "MESSAGE_EMBEDS_TOO_LARGE", "Embed size exceeds maximum size of 6000")
        if "components" in payload:
            flags = int(payload.get("flags") or (existing or {}).get("flags") or 0)
            problem = _component_problem(payload["components"], flags)
            if problem is not None:
                return _invalid(*problem)
        body_keys = ("content", "embeds", "attachments", "sticker_ids", "components", "poll")
        merged = {**(existing or {}), **{k: v for k, v in payload.items() if k in body_keys}}
        if not (
            merged.get("content")
            or merged.get("embeds")
            or merged.get("attachments")
            or has_files
            or merged.get("sticker_ids")
            or merged.get("sticker_items")
            or merged.get("components")
            or merged.get("poll")
        ):
            return _error(400, "Cannot send an empty message", 50006)
        return self._validate_allowed_mentions(payload.get("allowed_mentions"))

    def _attachment(
        self, channel_id: str, filename: str, data: bytes, content_type: str | None, description: str | None = None
    ) -> JSON:
        aid = self._next_id()
        self._files[aid] = (content_type or "application/octet-stream", data)
        url = f"{self.base_url}/attachments/{channel_id}/{aid}/{urllib.parse.quote(filename)}"
        att = {
            "id": aid,
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }
        if description is not None:
            att["description"] = description
        return att

    def _uploaded_attachments(
        self, channel_id: str, payload: JSON, files: list[JSON], keep: Iterable[JSON] = ()
    ) -> list[JSON]:
        """Attachments from a multipart upload (``files[n]`` <-> ``attachments[].id == n``), plus kept ones."""
        by_index = {}
        for f in files:
            m = re.fullmatch(r"files\[(\d+)\]", f["field"] or "")
            if m:
                by_index[m.group(1)] = f
        kept = {a["id"]: a for a in keep}
        out: list[JSON] = []
        for spec in payload.get("attachments") or []:
            sid = str(spec.get("id"))
            if sid in by_index:
                f = by_index.pop(sid)
                filename = spec.get("filename") or f["filename"]
                out.append(
                    self._attachment(channel_id, filename, f["data"], f["content_type"], spec.get("description"))
                )
            elif sid in kept:
                out.append(kept[sid])
        for f in by_index.values():  # uploads without an attachments[] entry
            out.append(self._attachment(channel_id, f["filename"], f["data"], f["content_type"]))
        return out

    def _new_message(
        self,
        channel: JSON,
        author: JSON,
        *,
        content: str = "",
        allowed_mentions: JSON | None = None,
        extra_mentions: Iterable[str] = (),
        reference: JSON | None = None,
        embeds: list[JSON] | None = None,
        attachments: list[JSON] | None = None,
        sticker_items: list[JSON] | None = None,
        components: list[JSON] | None = None,
        msg_type: int = TYPE_DEFAULT,
        flags: int = 0,
        tts: bool = False,
        nonce: str | None = None,
        webhook_id: str | None = None,
        interaction: Interaction | None = None,
        message_id: str | None = None,
    ) -> JSON:
        """Build (but do not store) a message payload with Discord's mention semantics."""
        mid = message_id or self._next_id()
        mentions, roles, everyone, pinged = self._resolve_mentions(
            channel,
            content,
            allowed_mentions,
            # An interaction answer "replying" to the component's message pings nobody.
            reply_author=reference["author"]["id"] if reference and interaction is None else None,
            extra_users=extra_mentions,
        )
        msg: JSON = {
            "id": mid,
            "channel_id": channel["id"],
            "author": self._user_public(author),
            "content": content,
            "timestamp": _iso_from_snowflake(mid),
            "edited_timestamp": None,
            "tts": tts,
            "mention_everyone": everyone,
            "mentions": mentions,
            "mention_roles": roles,
            "mention_channels": [],
            "attachments": attachments or [],
            "embeds": embeds or [],
            "reactions": [],
            "pinned": False,
            "type": msg_type,
            "flags": flags,
            "components": _numbered_components(components or []),
            "_pinged": pinged,
            "_edits": [],
            "_created": time.monotonic(),
            "_first_content": content,  # as it was posted, before any edit
        }
        if channel.get("guild_id"):
            msg["guild_id"] = channel["guild_id"]
        if sticker_items:
            msg["sticker_items"] = sticker_items
        if nonce is not None:
            msg["nonce"] = nonce
        if webhook_id is not None:
            msg["webhook_id"] = webhook_id
            msg["application_id"] = str(self.application_id)
        if reference is not None:
            msg["type"] = TYPE_REPLY if msg_type == TYPE_DEFAULT else msg_type
            msg["message_reference"] = {
                "type": 0,
                "message_id": reference["id"],
                "channel_id": reference["channel_id"],
                **({"guild_id": reference["guild_id"]} if reference.get("guild_id") else {}),
            }
            ref = _public(reference)
            ref.pop("referenced_message", None)
            msg["referenced_message"] = ref
        if interaction is not None:
            user = self._user_public(interaction.user)
            owners = interaction.payload.get("authorizing_integration_owners", {})
            metadata: JSON = {
                "id": interaction.id,
                "type": interaction.type,
                "user": user,
                "authorizing_integration_owners": owners,
            }
            if interaction.command is not None:
                metadata.update(name=interaction.command["name"], command_type=interaction.command.get("type", 1))
                # The deprecated "interaction" field exists only for answers to commands; answers
                # to components are replies to the component's message instead.
                msg["interaction"] = {
                    "id": interaction.id,
                    "type": interaction.type,
                    "name": interaction.command["name"],
                    "user": user,
                }
            elif interaction.message is not None:
                metadata["interacted_message_id"] = interaction.message["id"]
            msg["interaction_metadata"] = metadata
        return msg

    def _gateway_message(self, msg: JSON) -> JSON:
        """MESSAGE_CREATE/UPDATE payload: the message plus the author's partial member in guilds."""
        data = _public(msg)
        gid = msg.get("guild_id")
        if gid and "webhook_id" not in msg:
            member = self._members.get(gid, {}).get(msg["author"]["id"])
            if member is not None:
                data["member"] = {k: copy.deepcopy(v) for k, v in member.items() if k != "user"}
        return data

    def _message_event(self, name: str, msg: JSON) -> _Event:
        gid = msg.get("guild_id")
        intent = Intents.GUILD_MESSAGES if gid else Intents.DIRECT_MESSAGES
        return _Event(name, self._gateway_message(msg), gid, intent, strip_content=True)

    def _store(self, msg: JSON) -> None:
        """Store a new message (no event): works whether or not a client is connected."""
        channel = self._channels[msg["channel_id"]]
        self._messages[channel["id"]].append(msg)
        self._message_index[msg["id"]] = msg
        channel["last_message_id"] = msg["id"]
        if channel["type"] in CH_THREAD_TYPES:
            channel["message_count"] += 1
            channel["total_message_sent"] += 1

    async def _store_and_dispatch(self, msg: JSON) -> None:
        self._store(msg)
        await self._emit(self._message_event("MESSAGE_CREATE", msg))

    async def _apply_edit(
        self,
        msg: JSON,
        payload: JSON,
        files: list[JSON],
        *,
        dispatch: bool,
        via: str | None = None,
        editor: JSON | None = None,
    ) -> None:
        """Apply an edit payload to a stored message; record it in ``_edits``; MESSAGE_UPDATE if visible.

        ``via`` names how the edit came (see ``edit_log``); ``None`` for message
        changes that are not edit requests (a followup replacing "thinking").
        """
        channel = self._channels[msg["channel_id"]]
        if "content" in payload:
            msg["content"] = payload["content"] or ""
        if "embeds" in payload:
            msg["embeds"] = payload["embeds"] or []
        if "components" in payload:
            msg["components"] = _numbered_components(payload["components"] or [])
        if "attachments" in payload or files:
            msg["attachments"] = self._uploaded_attachments(channel["id"], payload, files, keep=msg["attachments"])
        if "flags" in payload and payload["flags"] is not None:
            # Ephemerality is fixed at creation (for deferrals: by the type 5 callback).
            sticky = FLAG_EPHEMERAL | FLAG_LOADING
            msg["flags"] = (msg["flags"] & sticky) | (int(payload["flags"]) & ~sticky)
        was_loading = bool(msg["flags"] & FLAG_LOADING)
        msg["flags"] &= ~FLAG_LOADING
        if "content" in payload or "allowed_mentions" in payload:
            ref = self._message_index.get(msg.get("message_reference", {}).get("message_id", ""))
            mentions, roles, everyone, _ = self._resolve_mentions(
                channel,
                msg["content"],
                payload.get("allowed_mentions"),
                reply_author=ref["author"]["id"] if ref else None,
            )
            msg.update(mentions=mentions, mention_roles=roles, mention_everyone=everyone)  # edits never ping
        if not was_loading:
            msg["edited_timestamp"] = _now_iso()
        now = time.monotonic()
        msg["_edits"].append({"time": now, "content": msg["content"], "payload": payload})
        if via is not None:
            self.edit_log.append(
                {
                    "time": now,
                    "channel_id": msg["channel_id"],
                    "message_id": msg["id"],
                    "editor_id": (editor or self.bot_user)["id"],
                    "via": via,
                }
            )
        if dispatch:
            await self._emit(self._message_event("MESSAGE_UPDATE", msg))

    async def _remove_message(self, msg: JSON, *, dispatch: bool = True) -> None:
        msg["_deleted"] = True
        channel_msgs = self._messages.get(msg["channel_id"], [])
        if msg in channel_msgs:
            channel_msgs.remove(msg)
            channel = self._channels[msg["channel_id"]]
            if channel["type"] in CH_THREAD_TYPES and msg["type"] != TYPE_THREAD_STARTER_MESSAGE:
                channel["message_count"] = max(0, channel["message_count"] - 1)
        self._message_index.pop(msg["id"], None)
        self.reactions.pop((msg["channel_id"], msg["id"]), None)
        if dispatch:
            data = {"id": msg["id"], "channel_id": msg["channel_id"]}
            if msg.get("guild_id"):
                data["guild_id"] = msg["guild_id"]
            gid = msg.get("guild_id")
            await self._emit(
                _Event("MESSAGE_DELETE", data, gid, Intents.GUILD_MESSAGES if gid else Intents.DIRECT_MESSAGES)
            )

    # ------------------------------------------------------------------ REST: messages

    def _lookup(
        self, channel_id: str, message_id: str | None = None
    ) -> tuple[JSON | None, JSON | None, web.Response | None]:
        channel = self._channels.get(channel_id)
        if channel is None:
            return None, None, _error(404, "Unknown Channel", 10003)
        if message_id is None:
            return channel, None, None
        msg = self._message_index.get(message_id)
        if msg is None or msg["channel_id"] != channel_id:
            return channel, None, _error(404, "Unknown Message", 10008)
        return channel, msg, None

    async def _r_post_message(self, call: _Call, channel_id: str) -> web.Response:
        channel, _, err = self._lookup(channel_id)
        if err is not None:
            return err
        assert channel is not None
        payload: JSON = call.json or {}
        if channel["type"] in (CH_VOICE, CH_CATEGORY):
            return _error(400, "Cannot send messages in a non-text channel", 50008)
        # In threads SEND_MESSAGES has no effect; SEND_MESSAGES_IN_THREADS is what counts.
        in_thread = channel["type"] in CH_THREAD_TYPES
        needed = Permissions.SEND_MESSAGES_IN_THREADS if in_thread else Permissions.SEND_MESSAGES
        if not self._bot_can(channel, needed):
            return _error(403, "Missing Permissions", 50013)
        invalid = self._validate_message(payload, has_files=bool(call.files))
        if invalid is not None:
            return invalid
        reference = None
        ref_spec = payload.get("message_reference")
        if ref_spec:
            reference = self._message_index.get(str(ref_spec.get("message_id")))
            if reference is None or reference["channel_id"] != channel_id:
                reference = None
                if ref_spec.get("fail_if_not_exists", True):
                    return _invalid("message_reference", "REPLIES_UNKNOWN_MESSAGE", "Unknown message")
        msg = self._new_message(
            channel,
            self.bot_user,
            content=payload.get("content") or "",
            allowed_mentions=payload.get("allowed_mentions"),
            reference=reference,
            embeds=payload.get("embeds"),
            attachments=self._uploaded_attachments(channel_id, payload, call.files),
            sticker_items=[
                {"id": str(s), "name": "sticker", "format_type": 1} for s in payload.get("sticker_ids") or []
            ],
            components=payload.get("components"),
            flags=int(payload.get("flags") or 0),
            tts=bool(payload.get("tts")),
            nonce=payload.get("nonce"),
        )
        await self._store_and_dispatch(msg)
        return _json(_public(msg))

    async def _r_get_message(self, call: _Call, channel_id: str, message_id: str) -> web.Response:
        _, msg, err = self._lookup(channel_id, message_id)
        return err or _json(_public(msg))  # type: ignore[arg-type]

    async def _r_history(self, call: _Call, channel_id: str) -> web.Response:
        _, _, err = self._lookup(channel_id)
        if err is not None:
            return err
        try:
            limit = max(1, min(100, int(call.query.get("limit", 50))))
        except ValueError:
            return _invalid("limit", "NUMBER_TYPE_COERCE", "Value is not int.")
        msgs = self._messages[channel_id]  # oldest first
        if "before" in call.query:
            before = int(call.query["before"])
            picked = [m for m in msgs if int(m["id"]) < before][-limit:]
        elif "after" in call.query:
            after = int(call.query["after"])
            picked = [m for m in msgs if int(m["id"]) > after][:limit]
        elif "around" in call.query:
            around = int(call.query["around"])
            older = [m for m in msgs if int(m["id"]) <= around]
            newer = [m for m in msgs if int(m["id"]) > around]
            half = limit // 2
            picked = older[-(limit - half) :] + newer[:half]
        else:
            picked = msgs[-limit:]
        return _json([_public(m) for m in reversed(picked)])  # Discord returns newest first

    def _edit_rate_limited(self, channel_id: str) -> web.Response | None:
        """A 429 when ``edit_rate_limit`` is set and this channel's REST edits used up the window."""
        if self.edit_rate_limit is None:
            return None
        limit, window = self.edit_rate_limit
        now = time.monotonic()
        recent = [
            e["time"]
            for e in self.edit_log
            if e["channel_id"] == channel_id and e["via"] == "rest" and now - e["time"] < window
        ]
        if len(recent) < limit:
            return None
        # Rounded up (plus a little) so a client sleeping exactly retry_after is not early.
        retry_after = math.ceil((min(recent) + window - now) * 1000) / 1000 + 0.005
        return _rate_limited(retry_after, limit=limit, bucket="fake-message-edit")

    async def _r_edit_message(self, call: _Call, channel_id: str, message_id: str) -> web.Response:
        _, msg, err = self._lookup(channel_id, message_id)
        if err is not None:
            return err
        assert msg is not None
        limited = self._edit_rate_limited(channel_id)
        if limited is not None:
            return limited
        if msg["author"]["id"] != self.bot_user["id"]:
            return _error(403, "Cannot edit a message authored by another user", 50005)
        payload: JSON = call.json or {}
        invalid = self._validate_message(payload, has_files=bool(call.files), existing=msg)
        if invalid is not None:
            return invalid
        await self._apply_edit(msg, payload, call.files, dispatch=True, via="rest")
        return _json(_public(msg))

    async def _r_delete_message(self, call: _Call, channel_id: str, message_id: str) -> web.Response:
        channel, msg, err = self._lookup(channel_id, message_id)
        if err is not None:
            return err
        assert channel is not None and msg is not None
        if msg["author"]["id"] != self.bot_user["id"]:
            if channel["type"] == CH_DM:
                return _error(403, "Cannot execute action on a DM channel", 50003)
            if not self._bot_can(channel, Permissions.MANAGE_MESSAGES):
                return _error(403, "Missing Permissions", 50013)
        await self._remove_message(msg)
        return _no_content()

    async def _r_typing(self, call: _Call, channel_id: str) -> web.Response:
        if channel_id not in self._channels:
            return _error(404, "Unknown Channel", 10003)
        self.typing.append((channel_id, time.monotonic()))
        return _no_content()

    # ------------------------------------------------------------------ threads

    @staticmethod
    def _thread_problem(payload: JSON, *, with_type: bool) -> _Problem | None:
        """Discord's form checks on a start-thread body."""
        name = payload.get("name")
        if name is None:
            return "name", "BASE_TYPE_REQUIRED", "This field is required"
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            return "name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
        duration = payload.get("auto_archive_duration")
        if duration is not None and duration not in THREAD_ARCHIVE_DURATIONS:
            return "auto_archive_duration", "BASE_TYPE_CHOICES", "Value must be one of {60, 1440, 4320, 10080}."
        slowmode = payload.get("rate_limit_per_user")
        if slowmode is not None and not (isinstance(slowmode, int) and 0 <= slowmode <= 21600):
            return "rate_limit_per_user", "NUMBER_TYPE_MAX", "int value should be less than or equal to 21600."
        if with_type and payload.get("type") is not None and payload["type"] not in CH_THREAD_TYPES:
            return "type", "BASE_TYPE_CHOICES", "Value must be one of {10, 11, 12}."
        return None

    def _start_thread(
        self, parent: JSON, creator: JSON, payload: JSON, *, message: JSON | None
    ) -> tuple[JSON | None, web.Response | None]:
        """Create a thread as Discord's two start-thread routes do (permissions already checked).

        From a message: the thread takes the message's id, the message gets
        ``thread`` and the HAS_THREAD flag (a MESSAGE_UPDATE is queued after
        THREAD_CREATE), and the thread begins with a THREAD_STARTER_MESSAGE (type
        21) that only points at the message, as Discord's history shows it.
        """
        if parent["type"] not in (CH_TEXT, CH_NEWS):
            return None, _error(400, "Cannot execute action on this channel type", 50024)
        if message is not None:
            if message.get("thread") is not None or message["id"] in self._channels:
                return None, _error(400, "A thread has already been created for this message", 160004)
            ttype = CH_NEWS_THREAD if parent["type"] == CH_NEWS else CH_PUBLIC_THREAD
        else:
            ttype = payload.get("type") or CH_PRIVATE_THREAD  # Discord's default when omitted
            allowed = (CH_PUBLIC_THREAD, CH_PRIVATE_THREAD) if parent["type"] == CH_TEXT else (CH_NEWS_THREAD,)
            if ttype not in allowed:
                return None, _error(400, "Cannot execute action on this channel type", 50024)
        thread = self._make_thread(
            parent,
            payload["name"],
            type=ttype,
            owner_id=creator["id"],
            thread_id=message["id"] if message is not None else None,
            auto_archive_duration=payload.get("auto_archive_duration") or 1440,
            rate_limit_per_user=payload.get("rate_limit_per_user") or 0,
            invitable=payload.get("invitable", True) is not False,
        )
        if message is not None:
            message["thread"] = thread  # live: serialized with the thread's current state
            message["flags"] |= FLAG_HAS_THREAD
            self._emit_later(self._message_event("MESSAGE_UPDATE", message))
            starter = self._new_message(thread, self._users[message["author"]["id"]], message_id=thread["id"])
            starter.update(type=TYPE_THREAD_STARTER_MESSAGE, mentions=[], _pinged=[])
            starter["message_reference"] = {
                "type": 0,
                "message_id": message["id"],
                "channel_id": parent["id"],
                "guild_id": parent["guild_id"],
            }
            reference = _public(message)
            reference.pop("referenced_message", None)
            starter["referenced_message"] = reference
            self._messages[thread["id"]].append(starter)  # not indexed: the id is the parent message's
        return thread, None

    def _thread_create_allowed(self, parent: JSON, ttype: int) -> bool:
        needed = Permissions.CREATE_PRIVATE_THREADS if ttype == CH_PRIVATE_THREAD else Permissions.CREATE_PUBLIC_THREADS
        return self._bot_can(parent, needed | Permissions.VIEW_CHANNEL)

    async def _r_thread_from_message(self, call: _Call, channel_id: str, message_id: str) -> web.Response:
        channel, msg, err = self._lookup(channel_id, message_id)
        if err is not None:
            return err
        assert channel is not None and msg is not None
        if channel.get("guild_id") is None or channel["type"] not in (CH_TEXT, CH_NEWS):
            return _error(400, "Cannot execute action on this channel type", 50024)
        if not self._thread_create_allowed(channel, CH_PUBLIC_THREAD):
            return _error(403, "Missing Permissions", 50013)
        payload: JSON = call.json if isinstance(call.json, dict) else {}
        problem = self._thread_problem(payload, with_type=False)
        if problem is not None:
            return _invalid(*problem)
        thread, err = self._start_thread(channel, self.bot_user, payload, message=msg)
        if err is not None:
            return err
        assert thread is not None
        await self.flush()
        return _json(_public(thread), 201)

    async def _r_thread_without_message(self, call: _Call, channel_id: str) -> web.Response:
        channel, _, err = self._lookup(channel_id)
        if err is not None:
            return err
        assert channel is not None
        if channel.get("guild_id") is None or channel["type"] not in (CH_TEXT, CH_NEWS):
            return _error(400, "Cannot execute action on this channel type", 50024)
        payload: JSON = call.json if isinstance(call.json, dict) else {}
        problem = self._thread_problem(payload, with_type=True)
        if problem is not None:
            return _invalid(*problem)
        if not self._thread_create_allowed(channel, payload.get("type") or CH_PRIVATE_THREAD):
            return _error(403, "Missing Permissions", 50013)
        thread, err = self._start_thread(channel, self.bot_user, payload, message=None)
        if err is not None:
            return err
        assert thread is not None
        await self.flush()
        return _json(_public(thread), 201)

    async def _r_active_threads(self, call: _Call, guild_id: str) -> web.Response:
        if guild_id not in self._guilds:
            return _error(404, "Unknown Guild", 10004)
        threads = [
            _public(c)
            for c in self._channels.values()
            if c.get("guild_id") == guild_id and c["type"] in CH_THREAD_TYPES and not c["thread_metadata"]["archived"]
        ]
        return _json({"threads": threads, "members": []})

    async def start_thread(
        self,
        channel: ChannelRef,
        user: JSON,
        name: str,
        *,
        message: JSON | None = None,
        type: int = CH_PUBLIC_THREAD,
        auto_archive_duration: int = 1440,
    ) -> JSON:
        """``user`` starts a thread in ``channel`` (from ``message`` if given); THREAD_CREATE is dispatched.

        The same rules as the REST routes apply (the thread of a message has the
        message's id; ``type`` is ignored then).  Raises ValueError where Discord
        would answer with an error.
        """
        parent = self._channels[_cid(channel)]
        self._check_author(parent, user)
        payload = {"name": name, "type": type, "auto_archive_duration": auto_archive_duration}
        problem = self._thread_problem(payload, with_type=True)
        if problem is not None:
            raise ValueError(f"invalid thread: {problem}")
        stored = self._message_index[message["id"]] if message is not None else None
        thread, err = self._start_thread(parent, user, payload, message=stored)
        if err is not None:
            raise ValueError(f"Discord would refuse this thread: {err.text}")
        await self.flush()
        assert thread is not None
        return thread

    # ------------------------------------------------------------------ reactions

    def _reaction_summary(self, message_id: str) -> list[JSON]:
        out = []
        for emoji, users in self._reaction_users.get(message_id, {}).items():
            if users:
                out.append(
                    {
                        "emoji": _emoji_payload(emoji),
                        "count": len(users),
                        "count_details": {"burst": 0, "normal": len(users)},
                        "me": self.bot_user["id"] in users,
                        "me_burst": False,
                        "burst_me": False,
                        "burst_colors": [],
                        "burst_count": 0,
                    }
                )
        return out

    async def _set_reaction(self, msg: JSON, user: JSON, emoji: str, add: bool) -> bool:
        """Add/remove one user's reaction; dispatch MESSAGE_REACTION_ADD/REMOVE on change."""
        users = self._reaction_users.setdefault(msg["id"], {}).setdefault(emoji, [])
        present = user["id"] in users
        if present == add:
            return False
        if add:
            users.append(user["id"])
        else:
            users.remove(user["id"])
        msg["reactions"] = self._reaction_summary(msg["id"])
        if user["id"] == self.bot_user["id"]:
            mine = self.reactions.setdefault((msg["channel_id"], msg["id"]), [])
            if add:
                mine.append(emoji)
            else:
                mine.remove(emoji)
        gid = msg.get("guild_id")
        data: JSON = {
            "user_id": user["id"],
            "channel_id": msg["channel_id"],
            "message_id": msg["id"],
            "emoji": _emoji_payload(emoji),
            "burst": False,
            "type": 0,
        }
        if gid:
            data["guild_id"] = gid
        if add:
            data["message_author_id"] = msg["author"]["id"]
            data["burst_colors"] = []
            member = self._members.get(gid, {}).get(user["id"]) if gid else None
            if member is not None:
                data["member"] = copy.deepcopy(member)
        intent = Intents.GUILD_MESSAGE_REACTIONS if gid else Intents.DIRECT_MESSAGE_REACTIONS
        await self._emit(_Event("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", data, gid, intent))
        return True

    async def _r_add_reaction(self, call: _Call, channel_id: str, message_id: str, emoji: str) -> web.Response:
        channel, msg, err = self._lookup(channel_id, message_id)
        if err is not None:
            return err
        assert channel is not None and msg is not None
        if not self._bot_can(channel, Permissions.ADD_REACTIONS):
            return _error(403, "Missing Permissions", 50013)
        await self._set_reaction(msg, self.bot_user, emoji, True)
        return _no_content()

    async def _r_remove_reaction(self, call: _Call, channel_id: str, message_id: str, emoji: str) -> web.Response:
        _, msg, err = self._lookup(channel_id, message_id)
        if err is not None:
            return err
        assert msg is not None
        await self._set_reaction(msg, self.bot_user, emoji, False)
        return _no_content()

    # ------------------------------------------------------------------ application commands

    def _scope(self, app_id: str, guild_id: str | None) -> tuple[str | None, web.Response | None]:
        if app_id != str(self.application_id):
            return None, _error(403, "Missing Access", 50001)
        if guild_id is not None and (guild_id not in self._guilds or not self.bot_in(guild_id)):
            return None, _error(403, "Missing Access", 50001)  # as Discord: also for a guild that does not exist
        return (guild_id or "global"), None

    def _validate_options(self, options: list[JSON], where: str, depth: int) -> _Problem | None:
        if len(options) > 25:
            return where, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
        seen_optional = False
        names: set[str] = set()
        for i, opt in enumerate(options):
            loc = f"{where}.{i}"
            name = opt.get("name") or ""
            if not _COMMAND_NAME_RE.match(name) or name != name.lower():
                return f"{loc}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
            if name in names:
                return f"{loc}.name", "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS", "Option names must be unique"
            names.add(name)
            if not 1 <= len(opt.get("description") or "") <= 100:
                return f"{loc}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            if len(opt.get("choices") or []) > 25:
                return f"{loc}.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
            if opt.get("type") in _SUBCOMMAND_TYPES:
                if depth >= 2 or (opt["type"] == 2 and depth >= 1):
                    return loc, "APPLICATION_COMMAND_SUBCOMMAND_NESTING", "Subcommands nested too deeply"
                problem = self._validate_options(opt.get("options") or [], f"{loc}.options", depth + 1)
                if problem:
                    return problem
            elif opt.get("required"):
                if seen_optional:
                    message = "Required options must be placed before non-required options"
                    return f"{loc}.required", "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID", message
            else:
                seen_optional = True
        return None

    def _validate_command(self, cmd: JSON, where: str = "") -> _Problem | None:
        """Discord's checks on a command definition (names, descriptions, option order and counts)."""
        prefix = f"{where}." if where else ""
        ctype = cmd.get("type", 1)
        name = cmd.get("name") or ""
        if not _COMMAND_NAME_RE.match(name) or (ctype == 1 and name != name.lower()):
            return f"{prefix}name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
        desc = cmd.get("description") or ""
        if ctype == 1 and not 1 <= len(desc) <= 100:
            return f"{prefix}description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
        if ctype != 1 and desc:
            message = "Context menu commands cannot have description"
            return f"{prefix}description", "APPLICATION_COMMAND_INVALID_DESCRIPTION", message
        return self._validate_options(cmd.get("options") or [], f"{prefix}options", 0)

    def _command_payload(self, scope: str, cmd: JSON) -> JSON:
        ctype = cmd.get("type", 1)
        key = (scope, cmd["name"], ctype)
        command_id = self._command_ids.get(key)
        if command_id is None:
            command_id = self._command_ids[key] = self._next_id()
        default_perms = cmd.get("default_member_permissions")
        out: JSON = {
            "id": command_id,
            "application_id": str(self.application_id),
            "version": self._next_id(),
            "type": ctype,
            "name": cmd["name"],
            "name_localizations": cmd.get("name_localizations"),
            "description": cmd.get("description") or "",
            "description_localizations": cmd.get("description_localizations"),
            # discord.py sends an int; Discord stores and returns the bit set as a string.
            "default_member_permissions": None if default_perms is None else str(int(default_perms)),
            "dm_permission": cmd.get("dm_permission", True),
            "contexts": cmd.get("contexts"),
            "integration_types": cmd.get("integration_types") or [0],
            "nsfw": bool(cmd.get("nsfw", False)),
        }
        if cmd.get("options"):
            out["options"] = copy.deepcopy(cmd["options"])
        if scope != "global":
            out["guild_id"] = scope
        return out

    async def _r_get_commands(self, call: _Call, app_id: str, guild_id: str | None = None) -> web.Response:
        scope, err = self._scope(app_id, guild_id)
        return err or _json(self.commands.get(scope or "global", []))

    async def _r_put_commands(self, call: _Call, app_id: str, guild_id: str | None = None) -> web.Response:
        scope, err = self._scope(app_id, guild_id)
        if err is not None:
            return err
        assert scope is not None
        cmds = call.json
        if not isinstance(cmds, list):
            return _invalid("", "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
        if sum(1 for c in cmds if c.get("type", 1) == 1) > 100:
            return _invalid("", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        seen: set[tuple[str, int]] = set()
        for i, cmd in enumerate(cmds):
            problem = self._validate_command(cmd, str(i))
            key = (cmd.get("name", ""), cmd.get("type", 1))
            if problem is None and key in seen:
                problem = f"{i}.name", "APPLICATION_COMMAND_ALREADY_EXISTS", "Application command names must be unique"
            if problem is not None:
                return _invalid(*problem)
            seen.add(key)
        self.commands[scope] = [self._command_payload(scope, c) for c in cmds]
        return _json(self.commands[scope])

    async def _r_post_command(self, call: _Call, app_id: str, guild_id: str | None = None) -> web.Response:
        scope, err = self._scope(app_id, guild_id)
        if err is not None:
            return err
        assert scope is not None
        cmd = call.json or {}
        problem = self._validate_command(cmd)
        if problem is not None:
            return _invalid(*problem)
        payload = self._command_payload(scope, cmd)
        existing = self.commands.setdefault(scope, [])
        existing[:] = [c for c in existing if c["id"] != payload["id"]] + [payload]
        return _json(payload, 201)

    async def _r_delete_command(self, call: _Call, app_id: str, *ids: str) -> web.Response:
        guild_id, command_id = (ids[0], ids[1]) if len(ids) == 2 else (None, ids[0])
        scope, err = self._scope(app_id, guild_id)
        if err is not None:
            return err
        existing = self.commands.get(scope or "global", [])
        if not any(c["id"] == command_id for c in existing):
            return _error(404, "Unknown application command", 10063)
        existing[:] = [c for c in existing if c["id"] != command_id]
        return _no_content()

    # ------------------------------------------------------------------ interactions: driving

    def set_command_permissions(self, guild: JSON, name: str, overrides: Mapping[str, bool]) -> None:
        """What a server admin sets under Server Settings > Integrations: per user or role id
        (the guild id for @everyone), whether ``/name`` may be used, overriding the command's
        ``default_member_permissions`` (which is then only the default).  Apps cannot set these
        with a bot token, so there is no REST route; channel-level overrides are not modelled."""
        self._command_overrides[(_cid(guild), name)] = {str(k): bool(v) for k, v in overrides.items()}

    def _command_allowed(self, gid: str, user: JSON, command: JSON, member_perms: int) -> bool:
        """Discord's order: administrators always; then a user override, a role override (any
        allowing role wins), the @everyone override, and last default_member_permissions."""
        if member_perms & Permissions.ADMINISTRATOR:
            return True
        overrides = self._command_overrides.get((gid, command["name"]), {})
        if user["id"] in overrides:
            return overrides[user["id"]]
        member = self._members[gid].get(user["id"]) or {}
        by_role = [overrides[r] for r in member.get("roles", []) if r in overrides]
        if by_role:
            return any(by_role)
        if gid in overrides:
            return overrides[gid]
        default = command.get("default_member_permissions")
        # None: everyone; "0": administrators only; else every bit is needed.
        required = Permissions.ADMINISTRATOR if default is not None and int(default) == 0 else int(default or 0)
        return (member_perms & required) == required

    def _find_command(self, name: str, channel: JSON) -> tuple[JSON, list[str]]:
        """Synced command for ``"cmd"`` / ``"cmd sub"`` / ``"cmd group sub"``, guild scope first."""
        top, *subs = name.split()
        gid = channel.get("guild_id")
        for scope in ([gid] if gid else []) + ["global"]:
            for cmd in self.commands.get(scope, []):
                if cmd["name"] == top and cmd.get("type", 1) == 1:
                    return cmd, subs
        synced = {scope: [c["name"] for c in cmds] for scope, cmds in self.commands.items()}
        raise LookupError(f"no synced slash command {top!r} usable in channel {channel['id']}; synced: {synced}")

    def _option_payloads(
        self, definitions: list[JSON], values: Mapping[str, Any], channel: JSON, resolved: JSON
    ) -> list[JSON]:
        by_name = {d["name"]: d for d in definitions}
        out: list[JSON] = []
        for name, value in values.items():
            definition = by_name.get(name)
            if definition is None:
                raise KeyError(f"command has no option {name!r}; options: {sorted(by_name)}")
            otype = definition["type"]
            if otype in (3,):
                value = str(value)
            elif otype == 4:
                value = int(value)
            elif otype == 5:
                value = bool(value)
            elif otype == 10:
                value = float(value)
            elif otype in (6, 7, 8, 9, 11):
                value = self._resolve_option(otype, value, channel, resolved)
            out.append({"name": name, "type": otype, "value": value})
        missing = [d["name"] for d in definitions if d.get("required") and d["name"] not in values]
        if missing:
            raise ValueError(f"missing required option(s) {missing}")
        return out

    def _resolve_option(self, otype: int, value: Any, channel: JSON, resolved: JSON) -> str:
        """Snowflake options carry an id plus an entry in ``data.resolved``, like Discord sends."""
        gid = channel.get("guild_id")
        if otype == 11:
            att = self._attachment(
                channel["id"], value.get("filename", "file.bin"), value.get("data", b""), value.get("content_type")
            )
            resolved.setdefault("attachments", {})[att["id"]] = att
            return att["id"]
        obj = value if isinstance(value, dict) else None
        oid = str(obj["id"]) if obj else str(value)
        if otype == 6 or (otype == 9 and (obj is None or "username" in obj) and oid in self._users):
            resolved.setdefault("users", {})[oid] = self._user_public(self._users[oid])
            member = self._members.get(gid, {}).get(oid) if gid else None
            if member is not None and gid is not None:
                partial = {k: copy.deepcopy(v) for k, v in member.items() if k != "user"}
                partial["permissions"] = str(self.permissions_of(self._guilds[gid], self._users[oid]))
                resolved.setdefault("members", {})[oid] = partial
        elif otype == 7:
            resolved.setdefault("channels", {})[oid] = {
                **_public(self._channels[oid]),
                "permissions": str(Permissions.ALL),
            }
        else:  # role (8) or mentionable role (9)
            role = next(r for r in self._roles.get(gid or "", []) if r["id"] == oid)
            resolved.setdefault("roles", {})[oid] = copy.deepcopy(role)
        return oid

    async def invoke_command(
        self,
        name: str,
        *,
        user: JSON,
        channel: JSON,
        options: Mapping[str, Any] | None = None,
        permissions: int | None = None,
    ) -> Interaction:
        """Dispatch INTERACTION_CREATE as if ``user`` ran ``/name`` in ``channel``.

        ``name`` may name a subcommand (``"cfg set"``).  Option values are
        converted to the synced option type; user/channel/role options take the
        fake's dicts (or ids) and are put into ``data.resolved``; attachment
        options take ``{"filename", "data", "content_type"}``.  Raises
        LookupError for unsynced commands and PermissionError when the member
        lacks the command's ``default_member_permissions`` (Discord hides it) and no
        :meth:`set_command_permissions` override allows it.
        """
        command, subs = self._find_command(name, channel)
        gid = channel.get("guild_id")
        contexts = command.get("contexts")
        if gid is None and (command.get("dm_permission") is False or (contexts is not None and 1 not in contexts)):
            raise PermissionError(f"/{command['name']} is not available in DMs")
        if gid is not None and contexts is not None and 0 not in contexts:
            raise PermissionError(f"/{command['name']} is not available in guilds")
        if gid is not None and user["id"] not in self._members[gid]:
            raise ValueError(f"user {user['username']} is not a member of guild {gid}; call add_member first")
        if permissions is not None:
            member_perms = permissions
        else:
            member_perms = self.permissions_of(self._guilds[gid], user) if gid else Permissions.DEFAULT_EVERYONE
        if gid is not None and not self._command_allowed(gid, user, command, member_perms):
            default = command.get("default_member_permissions")
            raise PermissionError(
                f"{user['username']} lacks default_member_permissions={default} for /{command['name']}"
                " (and no set_command_permissions override allows it)"
            )

        resolved: JSON = {}
        definitions: list[JSON] = command.get("options") or []
        chain: list[JSON] = []
        for sub in subs:
            found = next((o for o in definitions if o["name"] == sub and o["type"] in _SUBCOMMAND_TYPES), None)
            if found is None:
                raise LookupError(f"/{command['name']} has no subcommand {sub!r}")
            chain.append(found)
            definitions = found.get("options") or []
        leaf_options = self._option_payloads(definitions, options or {}, channel, resolved)
        for parent in reversed(chain):
            leaf_options = [{"name": parent["name"], "type": parent["type"], "options": leaf_options}]

        data: JSON = {"id": command["id"], "name": command["name"], "type": 1, "options": leaf_options}
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        if resolved:
            data["resolved"] = resolved
        payload = self._interaction_payload(IT_APPLICATION_COMMAND, data, channel, user, member_perms)
        return await self._dispatch_interaction(Interaction(self, payload, channel, user, command=command))

    def _interaction_payload(self, itype: int, data: JSON, channel: JSON, user: JSON, member_perms: int) -> JSON:
        """The INTERACTION_CREATE body common to commands and components."""
        gid = channel.get("guild_id")
        payload: JSON = {
            "id": self._next_id(),
            "application_id": str(self.application_id),
            "type": itype,
            "data": data,
            "channel_id": channel["id"],
            "channel": _public(channel),
            "token": "itok." + secrets.token_urlsafe(32),
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if gid is not None:
            member = copy.deepcopy(self._members[gid][user["id"]])
            member["permissions"] = str(member_perms)
            payload.update(
                guild_id=gid,
                guild={"id": gid, "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=member,
                app_permissions=str(self.permissions_of(self._guilds[gid], self.bot_user)),
                authorizing_integration_owners={"0": gid},
                context=0,
            )
        else:
            payload.update(
                user=self._user_public(user),
                app_permissions=str(Permissions.DEFAULT_EVERYONE),
                authorizing_integration_owners={"0": "0"},
                context=1,
            )
        return payload

    async def _dispatch_interaction(self, interaction: Interaction) -> Interaction:
        self.interactions.append(interaction)
        self._interactions_by_id[interaction.id] = interaction
        self._interactions_by_token[interaction.token] = interaction
        await self._emit(_Event("INTERACTION_CREATE", interaction.payload, interaction.channel.get("guild_id"), None))
        return interaction

    def _find_interaction_message(self, message: JSON | str | int) -> JSON | None:
        """A stored message by id, including ephemeral ones (which live only in interactions)."""
        mid = _cid(message)
        found = self._message_index.get(mid)
        if found is not None:
            return found
        for it in reversed(self.interactions):
            for m in ([it.original] if it.original else []) + it.followups:
                if m["id"] == mid and not m.get("_deleted"):
                    return m
        return None

    async def press_button(
        self, message: JSON, custom_id: str, user: JSON, *, channel: JSON | None = None
    ) -> Interaction:
        """``user`` clicks the button ``custom_id`` on ``message``: dispatch a MESSAGE_COMPONENT interaction.

        ``message`` is a message dict (or id) the fake stores, ephemeral
        interaction messages included; ``channel`` defaults to the message's
        channel.  Like the Discord client, this refuses (ValueError) to press a
        button that is not on the message's current components, is disabled,
        is a link/premium button, or that ``user`` cannot see (an ephemeral
        message of someone else; not a member/recipient).
        """
        stored = self._find_interaction_message(message)
        if stored is None:
            raise ValueError(f"no message {_cid(message)} (deleted?)")
        channel = self._channels[_cid(channel) if channel is not None else stored["channel_id"]]
        if stored["channel_id"] != channel["id"]:
            raise ValueError(f"message {stored['id']} is not in channel {channel['id']}")
        self._check_author(channel, user)
        if stored["flags"] & FLAG_EPHEMERAL:
            owner = (stored.get("interaction_metadata") or {}).get("user", {}).get("id")
            if owner != user["id"]:
                raise ValueError(f"message {stored['id']} is ephemeral and not visible to {user['username']}")
        button = next(
            (
                c
                for c in _iter_components(stored.get("components") or [])
                if c.get("type") == COMPONENT_BUTTON and c.get("custom_id") == custom_id
            ),
            None,
        )
        if button is None:
            present = [c["custom_id"] for c in _iter_components(stored.get("components") or []) if c.get("custom_id")]
            raise ValueError(f"message {stored['id']} has no button {custom_id!r}; custom ids: {present}")
        if button.get("disabled"):
            raise ValueError(f"button {custom_id!r} is disabled")
        if button.get("style") in (BUTTON_LINK, BUTTON_PREMIUM):
            raise ValueError(f"button {custom_id!r} is a link/premium button: it sends no interaction")
        gid = channel.get("guild_id")
        member_perms = self.permissions_of(self._guilds[gid], user) if gid else Permissions.DEFAULT_EVERYONE
        data: JSON = {"custom_id": custom_id, "component_type": COMPONENT_BUTTON}
        if button.get("id"):
            data["id"] = button["id"]
        payload = self._interaction_payload(IT_MESSAGE_COMPONENT, data, channel, user, member_perms)
        payload["message"] = _public(stored)
        return await self._dispatch_interaction(Interaction(self, payload, channel, user, message=stored))

    # ------------------------------------------------------------------ interactions: REST

    async def _r_interaction_callback(self, call: _Call, interaction_id: str, token: str) -> web.Response:
        it = self._interactions_by_id.get(interaction_id)
        if it is None or it.token != token:
            return _error(404, "Unknown interaction", 10062)
        if it.acked_at is not None:
            it.errors.append("callback after the interaction was already acknowledged")
            return _error(400, "Interaction has already been acknowledged.", 40060)
        late = time.monotonic() - it.created_at
        if late > self.interaction_ack_timeout:
            it.errors.append(f"callback {late:.2f}s after creation (limit {self.interaction_ack_timeout}s)")
            return _error(404, "Unknown interaction", 10062)
        payload: JSON = call.json or {}
        rtype = payload.get("type")
        data: JSON = payload.get("data") or {}
        # 4 message, 5 deferred message, 9 modal; components also 6 deferred update, 7 update.
        valid = (4, 5, 6, 7, 9) if it.type == IT_MESSAGE_COMPONENT else (4, 5, 9)
        if rtype not in valid:
            kind = "a message component" if it.type == IT_MESSAGE_COMPONENT else "an application command"
            it.errors.append(f"callback type {rtype} is invalid for {kind}")
            reason = "Interaction response type is invalid for this interaction"
            return _invalid("type", "INTERACTION_RESPONSE_TYPE_INVALID", reason)
        message: JSON | None = None  # the message the callback created or updated
        if rtype in (4, 7):
            existing = it.message if rtype == 7 else None
            invalid = self._validate_message(data, has_files=bool(call.files), existing=existing)
            if invalid is not None:
                it.errors.append(f"invalid message: {invalid.text}")
                return invalid
        if rtype == 4:
            message = self._interaction_message(it, data, call.files, flags=int(data.get("flags") or 0))
        elif rtype == 5:
            message = self._interaction_message(
                it, {}, [], flags=(int(data.get("flags") or 0) & FLAG_EPHEMERAL) | FLAG_LOADING
            )
            it._deferred_pending = True
        elif rtype == 9:
            it.modal = data
        it.responses.append(payload)
        it.acked_at = time.monotonic()
        if rtype in (6, 7):
            # @original of a component interaction is the message the component is on.
            it.original = it.message
            if rtype == 7 and it.message is not None:
                message = it.message
                visible = not message["flags"] & FLAG_EPHEMERAL
                await self._apply_edit(message, data, call.files, dispatch=visible, via="update")
        elif message is not None:
            it.original = message
            if not message["flags"] & FLAG_EPHEMERAL:
                await self._store_and_dispatch(message)
        self._notify()
        if call.query.get("with_response") not in ("1", "true", "True"):
            return _no_content()
        resource: JSON = {"type": rtype}
        if message is not None:
            resource["message"] = _public(message)
        body = {
            "interaction": {
                "id": it.id,
                "type": it.type,
                "activity_instance_id": None,
                "response_message_id": message["id"] if message else None,
                "response_message_loading": rtype == 5,
                "response_message_ephemeral": bool(message and message["flags"] & FLAG_EPHEMERAL),
            },
            "resource": resource,
        }
        return _json(body)

    def _interaction_message(self, it: Interaction, data: JSON, files: list[JSON], *, flags: int) -> JSON:
        return self._new_message(
            it.channel,
            self.bot_user,
            content=data.get("content") or "",
            allowed_mentions=data.get("allowed_mentions"),
            embeds=data.get("embeds"),
            attachments=self._uploaded_attachments(it.channel["id"], data, files),
            components=data.get("components"),
            # Answers to a command are "chat input command" messages; answers to a component
            # are replies to the component's message.
            msg_type=TYPE_CHAT_INPUT_COMMAND if it.command is not None else TYPE_DEFAULT,
            reference=it.message if it.command is None else None,
            flags=flags,
            tts=bool(data.get("tts")),
            webhook_id=str(self.application_id),
            interaction=it,
        )

    def _webhook_interaction(self, app_id: str, token: str) -> tuple[Interaction | None, web.Response | None]:
        it = self._interactions_by_token.get(token)
        if it is None or app_id != str(self.application_id):
            return None, _error(404, "Unknown Webhook", 10015)
        if it.acked_at is None:
            it.errors.append("webhook call before the interaction was acknowledged")
            return None, _error(404, "Unknown Webhook", 10015)
        return it, None

    def _webhook_message(self, it: Interaction, message_id: str) -> JSON | None:
        if message_id == "@original":
            return it.original
        for m in ([it.original] if it.original else []) + it.followups:
            if m["id"] == message_id and not m.get("_deleted"):
                return m
        return None

    async def _r_followup(self, call: _Call, app_id: str, token: str) -> web.Response:
        it, err = self._webhook_interaction(app_id, token)
        if err is not None:
            return err
        assert it is not None
        payload: JSON = call.json or {}
        invalid = self._validate_message(payload, has_files=bool(call.files))
        if invalid is not None:
            it.errors.append(f"invalid followup: {invalid.text}")
            return invalid
        if it._deferred_pending and it.original is not None:
            # Discord: the first followup after a deferral replaces the "thinking" message
            # (and keeps the deferral's ephemerality).
            it._deferred_pending = False
            message = it.original
            await self._apply_edit(message, payload, call.files, dispatch=not message["flags"] & FLAG_EPHEMERAL)
        else:
            message = self._interaction_message(it, payload, call.files, flags=int(payload.get("flags") or 0))
            if not message["flags"] & FLAG_EPHEMERAL:
                await self._store_and_dispatch(message)
        it.followups.append(message)
        self._notify()
        if call.query.get("wait") in ("1", "true", "True"):
            return _json(_public(message))
        return _no_content()

    async def _r_webhook_get(self, call: _Call, app_id: str, token: str, message_id: str) -> web.Response:
        it, err = self._webhook_interaction(app_id, token)
        if err is not None:
            return err
        assert it is not None
        message = self._webhook_message(it, message_id)
        return _json(_public(message)) if message else _error(404, "Unknown Message", 10008)

    async def _r_webhook_edit(self, call: _Call, app_id: str, token: str, message_id: str) -> web.Response:
        it, err = self._webhook_interaction(app_id, token)
        if err is not None:
            return err
        assert it is not None
        message = self._webhook_message(it, message_id)
        if message is None:
            return _error(404, "Unknown Message", 10008)
        payload: JSON = call.json or {}
        invalid = self._validate_message(payload, has_files=bool(call.files), existing=message)
        if invalid is not None:
            it.errors.append(f"invalid edit: {invalid.text}")
            return invalid
        if message is it.original:
            it._deferred_pending = False
        await self._apply_edit(
            message, payload, call.files, dispatch=not message["flags"] & FLAG_EPHEMERAL, via="webhook"
        )
        self._notify()
        return _json(_public(message))

    async def _r_webhook_delete(self, call: _Call, app_id: str, token: str, message_id: str) -> web.Response:
        it, err = self._webhook_interaction(app_id, token)
        if err is not None:
            return err
        assert it is not None
        message = self._webhook_message(it, message_id)
        if message is None:
            return _error(404, "Unknown Message", 10008)
        await self._remove_message(message, dispatch=not message["flags"] & FLAG_EPHEMERAL)
        if message is it.original:
            it.original = None
        return _no_content()

    # ------------------------------------------------------------------ driving the bot as a user

    def _check_author(self, channel: JSON, author: JSON) -> None:
        gid = channel.get("guild_id")
        if gid is not None and author["id"] not in self._members[gid]:
            raise ValueError(f"{author['username']} is not a member of guild {gid}; call add_member first")
        if gid is None and author["id"] != self.bot_user["id"]:
            recipients = [u["id"] for u in channel.get("recipients", [])]
            if author["id"] not in recipients:
                raise ValueError(f"{author['username']} is not a recipient of DM channel {channel['id']}")

    async def start_typing(self, channel: JSON, user: JSON) -> None:
        """``user`` starts typing in ``channel``: TYPING_START, to sessions with the typing intents
        (GUILD_MESSAGE_TYPING, DIRECT_MESSAGE_TYPING), with the member in guilds, as Discord sends it."""
        channel = self._channels[_cid(channel)]
        gid = channel.get("guild_id")
        data: JSON = {"channel_id": channel["id"], "user_id": user["id"], "timestamp": int(time.time())}
        if gid:
            self._check_author(channel, user)
            data["guild_id"] = gid
            data["member"] = copy.deepcopy(self._members[gid][user["id"]])
        self.typing_events.append(data)
        await self._emit(_Event("TYPING_START", data, gid, Intents.GUILD_MESSAGE_TYPING if gid else Intents.DIRECT_MESSAGE_TYPING))

    async def send_message(
        self,
        channel: JSON,
        author: JSON,
        content: str,
        *,
        mentions: Iterable[JSON] = (),
        reply_to: JSON | None = None,
        attachments: Iterable[JSON] = (),
        embeds: Iterable[JSON] = (),
        sticker_items: Iterable[JSON] = (),
        type: int = TYPE_DEFAULT,
    ) -> JSON:
        """Post a message as ``author`` (a user, member of the channel's guild) and dispatch MESSAGE_CREATE.

        Mentions come from ``mentions`` and ``<@id>``/``<@&id>``/``@everyone``
        in the content; a reply pings the replied-to author, like the Discord
        client's default.  ``attachments`` items are ``{"filename", "data":
        bytes, "content_type"}`` (served for download at their ``url``) or
        ready-made attachment payloads (with an ``id``).
        """
        channel = self._channels[_cid(channel)]
        self._check_author(channel, author)
        atts: list[JSON] = []
        for a in attachments:
            if "id" in a:
                atts.append(dict(a))
            else:
                filename = a.get("filename", "file.bin")
                atts.append(self._attachment(channel["id"], filename, a.get("data", b""), a.get("content_type")))
        msg = self._new_message(
            channel,
            author,
            content=content,
            allowed_mentions=None,
            extra_mentions=[m["id"] for m in mentions],
            reference=self._message_index.get(reply_to["id"]) if reply_to else None,
            embeds=list(embeds),
            attachments=atts,
            sticker_items=list(sticker_items),
            msg_type=type,
            nonce=str(secrets.randbits(60)),
        )
        await self._store_and_dispatch(msg)
        return msg

    async def edit_message(self, message: JSON, content: str) -> JSON:
        """Edit a stored message's content (as its author) and dispatch MESSAGE_UPDATE."""
        msg = self._message_index[message["id"]]
        author = self._users[msg["author"]["id"]]
        await self._apply_edit(msg, {"content": content}, [], dispatch=True, via="user", editor=author)
        return msg

    async def delete_message(self, message: JSON) -> None:
        """Delete a stored message and dispatch MESSAGE_DELETE."""
        msg = self._message_index.get(message["id"])
        if msg is not None:
            await self._remove_message(msg)

    async def add_reaction(self, message: JSON, user: JSON, emoji: str) -> None:
        """``user`` reacts to a message (MESSAGE_REACTION_ADD)."""
        await self._set_reaction(self._message_index[message["id"]], user, emoji, True)

    async def remove_reaction(self, message: JSON, user: JSON, emoji: str) -> None:
        """``user`` removes a reaction (MESSAGE_REACTION_REMOVE)."""
        await self._set_reaction(self._message_index[message["id"]], user, emoji, False)
