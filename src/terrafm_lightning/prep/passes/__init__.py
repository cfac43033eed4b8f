"""Passes over a written store: WorldCover labels and band statistics."""
