"""Latent and text-encoder caches: Musubi-compatible files plus our staleness metadata."""
