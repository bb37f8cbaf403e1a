"""Buttons under the bot's replies: Stop while a reply is written, Regenerate (and
Continue, when it ended at the length limit) once it is done.

Part of the Discord adapter. Each button is a `discord.ui.DynamicItem`: its
custom_id says what it acts on, `llamabot:<action>:<answered message id>:<author id>`
(the user's message the reply answers, and who wrote it), and the bot registers
the class at start (`add_dynamic_items`). So a button works however old its
message is, also after a restart, with nothing kept in memory. What a press
does is the bot's business (`LlamaBot.on_reply_button`); this module only knows
how the buttons look and what their ids say.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import discord

if TYPE_CHECKING:
    from bot.discord_adapter.client import LlamaBot

STOP, REGENERATE, CONTINUE = "stop", "regen", "cont"
_LOOKS: dict[str, tuple[str, str, discord.ButtonStyle]] = {
    STOP: ("Stop", "\u23f9\ufe0f", discord.ButtonStyle.danger),
    REGENERATE: ("Regenerate", "\U0001f504", discord.ButtonStyle.secondary),
    CONTINUE: ("Continue", "\u23e9", discord.ButtonStyle.primary),
}


class ReplyButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"llamabot:(?P<action>stop|regen|cont):(?P<answered>[0-9]{1,20}):(?P<author>[0-9]{1,20})",
):
    """One button under a reply; which one, and for which reply, is in its custom_id."""

    def __init__(self, action: str, answered: int, author: int) -> None:
        label, emoji, style = _LOOKS[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=custom_id(action, answered, author)))
        self.action = action
        self.answered = answered  # the Discord id of the message the reply answers
        self.author = author  # who wrote that message: they (and admins) may press

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: re.Match[str]
    ) -> ReplyButton:
        return cls(match["action"], int(match["answered"]), int(match["author"]))

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """BLOCKED_USER_IDS and the allowed lists hold for buttons as for messages and commands."""
        return await cast("LlamaBot", interaction.client).check_interaction(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = cast("LlamaBot", interaction.client)
        await bot.on_reply_button(interaction, self.action, self.answered, self.author)


def custom_id(action: str, answered: int, author: int) -> str:
    return f"llamabot:{action}:{answered}:{author}"


def writing_view(answered: int, author: int) -> discord.ui.View:
    """Under a reply being written: Stop."""
    view = discord.ui.View(timeout=None)
    view.add_item(ReplyButton(STOP, answered, author))
    return view


def finished_view(answered: int, author: int, *, can_continue: bool) -> discord.ui.View:
    """Under a finished reply: Regenerate, and Continue when it stopped at the length limit."""
    view = discord.ui.View(timeout=None)
    view.add_item(ReplyButton(REGENERATE, answered, author))
    if can_continue:
        view.add_item(ReplyButton(CONTINUE, answered, author))
    return view


def has_button(message: discord.Message, action: str) -> bool:
    """Whether `message` shows one of our buttons for `action`."""
    prefix = f"llamabot:{action}:"
    for row in message.components:
        for child in getattr(row, "children", [row]):
            if (getattr(child, "custom_id", None) or "").startswith(prefix):
                return True
    return False
