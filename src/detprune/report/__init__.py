"""Reporting: paper-style tables (CSV, Markdown, LaTeX) and figures from metrics records."""
