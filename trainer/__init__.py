"""The trainer: turns logged preferences into new policy versions; builds the toy world's models."""
