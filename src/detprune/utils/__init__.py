"""Small shared helpers: atomic file output, provenance, seeding."""
