"""Importance criteria: one file per criterion family."""
