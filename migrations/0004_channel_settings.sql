-- Per-channel persona and sampling, and text attachments read into the prompt.

-- A channel's own settings (/settings); NULL: the configured default (TEMPERATURE, TOP_P,
-- LLAMA_N_PREDICT, THINKING). The system prompt already has its column (/system).
ALTER TABLE conversations ADD COLUMN temperature REAL;
ALTER TABLE conversations ADD COLUMN top_p REAL;
ALTER TABLE conversations ADD COLUMN n_predict INTEGER;
ALTER TABLE conversations ADD COLUMN thinking TEXT;

-- The text files attached to a user's message, as they are put in the prompt (each a fenced
-- block headed by its file name). Apart from `content` so that an edit of the message changes
-- its text and keeps its files, as Discord does.
ALTER TABLE messages ADD COLUMN attachments TEXT;
