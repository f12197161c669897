"""The append-only, hash-chained audit log: writer, verifier, checkpoints, export, retention."""
