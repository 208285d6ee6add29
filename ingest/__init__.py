"""Getting data into a store: spool shards (written by workers), the single-writer ingest, and
checkpoints from a user's own training loop (``Recorder``)."""
