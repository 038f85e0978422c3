"""The built-in target profiles, installed as the package ``edgekit.builtin_targets`` (see pyproject.toml)."""
