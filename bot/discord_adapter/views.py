"""How the buttons under the bot's replies look, and what their ids say.

Stop while a reply is written; Regenerate (and Continue, when it ended at the length
limit) once it is done. Each button is a `discord.ui.DynamicItem`: its custom_id says
what it acts on, `llamabot:<action>:<answered message id>:<author id>` (the user's
message the reply answers, and who wrote it), and the bot registers the class at start
(`add_dynamic_items`). So a button works however old its message is, also after a
restart, with nothing kept in memory. A press is dispatched as the client event
`reply_button` (see `buttons.Buttons`, which decides what it does).
"""

from __future__ import annotations

import enum
import re
from typing import Any

import discord


class ButtonAction(str, enum.Enum):
    """What a button does; the value is what its custom_id carries."""

    STOP = "stop"
    REGENERATE = "regen"
    CONTINUE = "cont"

    __str__ = str.__str__


_LOOKS: dict[ButtonAction, tuple[str, str, discord.ButtonStyle]] = {
    ButtonAction.STOP: ("Stop", "\u23f9\ufe0f", discord.ButtonStyle.danger),
    ButtonAction.REGENERATE: ("Regenerate", "\U0001f504", discord.ButtonStyle.secondary),
    ButtonAction.CONTINUE: ("Continue", "\u23e9", discord.ButtonStyle.primary),
}
PRESSED = "reply_button"
"""The client event a press is dispatched as: `on_reply_button(interaction, action, answered, author)`."""


class ReplyButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"llamabot:(?P<action>stop|regen|cont):(?P<answered>[0-9]{1,20}):(?P<author>[0-9]{1,20})",
):
    """One button under a reply; which one, and for which reply, is in its custom_id."""

    def __init__(self, action: ButtonAction, answered: int, author: int) -> None:
        label, emoji, style = _LOOKS[action]
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=custom_id(action, answered, author)))
        self.action = action
        self.answered = answered  # the Discord id of the message the reply answers
        self.author = author  # who wrote that message: they (and admins) may press

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: re.Match[str]
    ) -> ReplyButton:
        return cls(ButtonAction(match["action"]), int(match["answered"]), int(match["author"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        interaction.client.dispatch(PRESSED, interaction, self.action, self.answered, self.author)


def custom_id(action: ButtonAction, answered: int, author: int) -> str:
    return f"llamabot:{action.value}:{answered}:{author}"


def writing_view(answered: int, author: int) -> discord.ui.View:
    """Under a reply being written: Stop."""
    view = discord.ui.View(timeout=None)
    view.add_item(ReplyButton(ButtonAction.STOP, answered, author))
    return view


def finished_view(answered: int, author: int, *, can_continue: bool) -> discord.ui.View:
    """Under a finished reply: Regenerate, and Continue when it stopped at the length limit."""
    view = discord.ui.View(timeout=None)
    view.add_item(ReplyButton(ButtonAction.REGENERATE, answered, author))
    if can_continue:
        view.add_item(ReplyButton(ButtonAction.CONTINUE, answered, author))
    return view


def has_button(message: discord.Message, action: ButtonAction) -> bool:
    """Whether `message` shows one of our buttons for `action`."""
    prefix = f"llamabot:{action.value}:"
    for row in message.components:
        for child in getattr(row, "children", [row]):
            if (getattr(child, "custom_id", None) or "").startswith(prefix):
                return True
    return False
