-- What the Discord bot needs on top of the core schema.

-- Channels where an admin turned on answering every message (/chat on|off).
ALTER TABLE conversations ADD COLUMN chat_enabled INTEGER NOT NULL DEFAULT 0;

-- "ok": part of the conversation. "stopped": cut short by /stop, still shown to the model.
-- "undelivered": the reply could not be posted, so the model must not see it as said.
ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'ok';

-- Edits and deletes in Discord find the stored turn by its message id.
CREATE INDEX messages_by_platform_id ON messages(platform_message_id) WHERE platform_message_id IS NOT NULL;
