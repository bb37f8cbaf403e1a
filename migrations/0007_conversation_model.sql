-- The model a conversation is answered by (/model), by its catalogue name (MODELS, MODELS_DIR;
-- with BACKEND=openai, the server's model id). NULL: the default model (MODEL_PATH, OPENAI_MODEL).
ALTER TABLE conversations ADD COLUMN model TEXT;
