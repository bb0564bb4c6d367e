"""``python -m toyworld evaluate-loop``: the online loop run against the toy world's hidden gold reward."""
