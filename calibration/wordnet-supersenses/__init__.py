"""The WordNet supersense demo set, installed as the package ``edgekit.demo_data`` (see pyproject.toml)."""
