"""What models read and write: chat templates (prompts) and reasoning markup (replies).

The bottom layer: it imports nothing else of the bot, and both the engine and the
conversation layer build on it."""
