"""The conversation layer: history in SQLite, prompts from history, replies to store.

`service.ChatService` is the one door the front ends use; `store` is SQLite (only
this layer touches it); `attachments` and `export` turn files and histories into
text, `images` checks and converts pictures before they are stored; `scheduler` is the fair queue of replies. Platform-neutral: no Discord here."""
