-- Durable from arrival, and reasoning models.

-- A message the bot will answer is stored the moment it arrives, as 'pending', and
-- becomes 'ok' with its reply. 'expired': it will never be answered (it waited across a
-- restart longer than RESUME_MAX_AGE_S and got a note instead, or the queue was full).
-- Neither is ever shown to the model.
-- The Discord message the bot already posted for a pending turn (its place-in-line note, or
-- the reply as far as it was streamed), so a restart finishes that message instead of a new one.
ALTER TABLE messages ADD COLUMN reply_message_id TEXT;

-- A reasoning model's private thoughts, kept apart from its answer: never put in a prompt.
ALTER TABLE messages ADD COLUMN reasoning TEXT;

-- Where to read what arrived while the bot was down (the Discord channel, thread or DM).
ALTER TABLE conversations ADD COLUMN channel_id TEXT;

-- Nothing is answered twice: one stored user turn per platform message.
DELETE FROM messages WHERE role = 'user' AND platform_message_id IS NOT NULL AND id NOT IN (
    SELECT MIN(id) FROM messages WHERE role = 'user' AND platform_message_id IS NOT NULL GROUP BY platform_message_id
);
CREATE UNIQUE INDEX messages_one_user_turn ON messages(platform_message_id) WHERE role = 'user' AND platform_message_id IS NOT NULL;

CREATE INDEX messages_pending ON messages(status) WHERE status = 'pending';
