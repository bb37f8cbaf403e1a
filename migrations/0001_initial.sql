-- Conversations and their messages. A conversation is one scope: a Discord
-- guild channel or thread, one DM user, or one terminal chat.
CREATE TABLE conversations (
    id            INTEGER PRIMARY KEY,
    scope         TEXT NOT NULL UNIQUE,   -- "guild:<g>:channel:<c>", "dm:<user>", "terminal:<name>"
    template      TEXT,                   -- prompt template for this conversation; NULL: the configured one
    system_prompt TEXT,                   -- NULL: the configured one
    created_at    TEXT NOT NULL
);

CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY,
    conversation_id     INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role                TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content             TEXT NOT NULL,
    author_id           TEXT,
    author_name         TEXT,
    platform_message_id TEXT,             -- the Discord message id, when there is one
    created_at          TEXT NOT NULL,
    token_count         INTEGER           -- tokens of `content` with the model that stored it
);

CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
