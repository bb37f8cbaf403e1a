-- Images attached to users' messages, which a model that can see reads with the turn.

-- The bytes (PNG or JPEG, as the chat layer stores them) are kept once per content, keyed by
-- their SHA-256, however many messages or channels show the same picture.
CREATE TABLE image_blobs (
    sha256 TEXT PRIMARY KEY,
    data   BLOB NOT NULL
);

-- Which message has which images, in order, under the file name they came with. They go
-- with their message (ON DELETE CASCADE: /reset, deletes) and follow its id (ON UPDATE
-- CASCADE: a turn moves to the end of the history when it is answered).
CREATE TABLE message_images (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE ON UPDATE CASCADE,
    position   INTEGER NOT NULL,
    name       TEXT NOT NULL,
    sha256     TEXT NOT NULL REFERENCES image_blobs(sha256),
    mime       TEXT NOT NULL,
    width      INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    PRIMARY KEY (message_id, position)
);
CREATE INDEX message_images_by_sha256 ON message_images(sha256);

-- A picture's bytes go when the last message showing it does.
CREATE TRIGGER image_blobs_unused AFTER DELETE ON message_images
WHEN NOT EXISTS (SELECT 1 FROM message_images WHERE sha256 = OLD.sha256)
BEGIN
    DELETE FROM image_blobs WHERE sha256 = OLD.sha256;
END;
