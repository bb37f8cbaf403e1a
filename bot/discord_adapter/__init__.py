"""The Discord front end: events and slash commands in, replies out, over `ChatService`."""
