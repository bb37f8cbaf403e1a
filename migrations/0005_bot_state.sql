-- What the bot remembers about itself across restarts, as key/value pairs: for now when it
-- was last connected to Discord ("discord.connected_until", unix seconds), so that a restart
-- reads only the channels where something was written since (see README, "Restarts").
CREATE TABLE bot_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
