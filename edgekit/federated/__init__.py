"""Federated fine-tuning (``edgekit federated``): sites train LoRA adapters on data that never leaves them.

- ``partition``: how a simulation deals the training rows to sites (iid, Dirichlet label skew, by a data column);
- ``site``: the model every party builds alike, a site's local training, and the Flower client around it;
- ``privacy``: client-side clipping and Gaussian noise, and the ε they amount to;
- ``coordinator``: admission of sites, Flower's server loop with FedAvg / FedProx, per-round judging and the record;
- ``runs``: simulate, serve and join, and the hand-off of the merged model to the build pipeline.
"""

import os

# Flower reports usage (host, platform, events) to its telemetry server unless told not to, and reads this when
# flwr is first imported: edgekit's federations send nothing anywhere but between their own parties.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
