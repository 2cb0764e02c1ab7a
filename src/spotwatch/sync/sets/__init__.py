"""Checkpoint sets: their manifests, sealing a set once every file is durable, and listing
the sets in S3."""
