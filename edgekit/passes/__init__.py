"""One module per pass. Each exposes ``Options``, ``options_for(config, target)``, ``run`` and ``PASS``.

The order a build runs them in is the literal list in ``edgekit/pipeline.py``.
"""
