"""Secure aggregation: the coordinator learns the sum of the sites' updates and nothing about any one of them.

The SecAgg+ protocol (Bell et al., 2020, after Bonawitz et al., 2017) as Flower's SecAgg+ workflow runs it, carried by
edgekit's coordinator loop instead of Flower's SuperLink, with every site of a round a neighbour of every other:

1. **keys**: each site makes two X25519 key pairs (one to encrypt the shares it sends, one to agree pairwise masks)
   and a private mask seed, and sends the two public keys.
2. **shares**: given every site's public keys, each site splits its mask seed and its mask private key into Shamir
   shares, any ``threshold`` of which rebuild the secret (Flower's ``shamir``), and sends each other site its share,
   encrypted for that site; the coordinator only relays ciphertexts.
3. **masked update** (the round's fit): each site trains, encodes rows x (its tensors - the global ones) in fixed
   point (``FRACTION_BITS``), and adds its private mask and one mask per other site (added by the site whose name
   sorts first, subtracted by the other; both derive it from their key agreement), all mod 2^64. One masked update
   alone is uniformly random to whoever reads it.
4. **unmask**: the sites still there send their shares of every surviving site's seed and of every dropped site's
   mask key, never both for one site. The coordinator rebuilds them, removes the masks from the sum of the masked
   updates (the pairwise masks of the survivors cancel), decodes it and divides by the rows: FedAvg's weighted mean.

Masks are ChaCha20 key streams (a seed of 32 bytes), not Flower's ``pseudo_rand_gen``, whose NumPy generator is
seeded with 32 bits. A coalition of fewer than ``threshold`` sites with the coordinator learns nothing about another
site's update; the threshold is ``min_fit_clients`` (so every round that may finish can be unmasked), at least 2.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgekit.errors import EdgekitError

STAGE = "secagg"  # the properties key (keys, shares, unmask stages) and the fit-config key (masked update)
FRACTION_BITS = 24  # fixed point: 2^-24 ≈ 6e-8 steps
SEED_BYTES = 32
SUM_LIMIT = 2.0 ** (63 - FRACTION_BITS - 1)  # |a value of the sum|: 2^38 ≈ 2.7e11, encoded below 2^62, inside int64's 2^63
PUBLIC_KEY_BYTES = 32  # X25519
PROTOCOL = "SecAgg+ (every site a neighbour); X25519 key agreement, Fernet-encrypted Shamir shares, ChaCha20 masks mod 2^64"


class SecureAggregationError(EdgekitError):
    """A stage of secure aggregation could not complete (too few shares, a site that broke the protocol)."""


# ---------------------------------------------------------------------------------------------- primitives


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _agreed(private: X25519PrivateKey, public: bytes, purpose: bytes) -> bytes:
    """32 bytes both ends of an X25519 agreement derive, one value per ``purpose``."""
    secret = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


def _mask(seed: bytes, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform uint64 tensors of ``shapes`` from a ChaCha20 key stream keyed by ``seed``."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    stream = Cipher(algorithms.ChaCha20(hashlib.sha256(seed).digest(), bytes(16)), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(8 * sum(sizes))), dtype="<u8")
    parts, start = [], 0
    for shape, size in zip(shapes, sizes):
        parts.append(words[start:start + size].reshape(shape).astype(np.uint64))
        start += size
    return parts


def encode(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Float tensors in fixed point, as uint64 words (two's complement): sums of them wrap as int64 sums do."""
    return [np.round(np.asarray(a, np.float64) * 2.0 ** FRACTION_BITS).astype(np.int64).view(np.uint64) for a in arrays]


def decode(words: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(w, np.uint64).view(np.int64).astype(np.float64) / 2.0 ** FRACTION_BITS for w in words]


def _shares(secret: bytes, threshold: int, count: int) -> list[bytes]:
    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    return create_shares(secret, threshold, count)


def _combined(shares: list[bytes]) -> bytes:
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    return combine_shares(shares)


def _json(payload: dict) -> str:
    return json.dumps(payload, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------- a site


@dataclass
class SiteSecrets:
    """One site's part of one round: its keys and seed, and the shares other sites sent it (decrypted when asked)."""

    name: str
    round: int
    encryption_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    mask_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    public_keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # site → (encryption, mask) public keys
    own_shares: tuple[bytes, bytes] | None = None  # this site's own share of its seed and mask key
    incoming: dict[str, str] = field(default_factory=dict)  # site → the ciphertext of its shares for this site
    threshold: int = 0  # the shares' threshold, fixed when they are made
    masked_once: bool = False
    revealed: bool = False

    def keys(self) -> dict:
        return {"encryption": _public_bytes(self.encryption_key.public_key()).hex(),
                "mask": _public_bytes(self.mask_key.public_key()).hex()}

    def share(self, public_keys: dict[str, tuple[bytes, bytes]], threshold: int) -> dict[str, str]:
        """Split the seed and the mask key among the round's sites (this one included); the ciphertext for each other."""
        if self.name not in public_keys:
            raise SecureAggregationError(f"the coordinator's key list for round {self.round} leaves out this site ({self.name})")
        if not 2 <= threshold <= len(public_keys):
            raise SecureAggregationError(f"a threshold of {threshold} shares for {len(public_keys)} sites cannot protect or rebuild a secret")
        if any(len(pair[0]) != PUBLIC_KEY_BYTES or len(pair[1]) != PUBLIC_KEY_BYTES for pair in public_keys.values()):
            raise SecureAggregationError(f"a public key in round {self.round}'s key list is not {PUBLIC_KEY_BYTES} bytes")
        self.public_keys, self.threshold = dict(public_keys), threshold
        names = sorted(public_keys)
        seed_shares = _shares(self.seed, threshold, len(names))
        key_shares = _shares(_private_bytes(self.mask_key), threshold, len(names))
        sent = {}
        for name, seed_share, key_share in zip(names, seed_shares, key_shares):
            if name == self.name:
                self.own_shares = (seed_share, key_share)
                continue
            fernet = Fernet(base64.urlsafe_b64encode(_agreed(self.encryption_key, public_keys[name][0], b"edgekit shares")))
            plaintext = _json({"from": self.name, "to": name, "round": self.round, "seed": seed_share.hex(), "key": key_share.hex()})
            sent[name] = fernet.encrypt(plaintext.encode()).decode()
        return sent

    def masked(self, update: list[np.ndarray], neighbours: list[str], incoming: dict[str, str]) -> list[np.ndarray]:
        """``update`` (already rows x (tensors - global)) encoded and masked for the round's ``neighbours``."""
        self.check_orders(neighbours, incoming)
        if self.masked_once:  # two updates under one set of masks would give away their difference
            raise SecureAggregationError(f"round {self.round}'s masks were used already; a new key exchange must come first")
        limit = SUM_LIMIT / len(neighbours)  # so that the sum of every neighbour's values cannot wrap around
        for array in update:
            values = np.asarray(array, np.float64)
            if not np.all(np.isfinite(values)) or (values.size and np.abs(values).max() >= limit):
                raise SecureAggregationError(f"this site's values are not finite or beyond ±{limit:.2g} (a diverged "
                                             "training?); they cannot be encoded for secure aggregation")
        self.masked_once = True
        self.incoming = {name: incoming[name] for name in neighbours if name != self.name}
        words = encode(update)
        shapes = [w.shape for w in words]
        total = [w + m for w, m in zip(words, _mask(self.seed, shapes))]
        for name in neighbours:
            if name == self.name:
                continue
            pair = _mask(_agreed(self.mask_key, self.public_keys[name][1], b"edgekit pairwise mask"), shapes)
            total = [t + p if self.name < name else t - p for t, p in zip(total, pair)]
        return total

    def check_orders(self, neighbours: list[str], incoming: dict[str, str]) -> None:
        """Whether a round's fit orders can be followed (before training, so a bad order wastes no training)."""
        if self.name not in neighbours:
            raise SecureAggregationError(f"round {self.round}'s neighbours leave out this site ({self.name})")
        unknown = sorted(set(neighbours) - set(self.public_keys))
        if unknown:
            raise SecureAggregationError(f"round {self.round}'s neighbours {unknown} were not in its key exchange")
        missing = [name for name in neighbours if name != self.name and name not in incoming]
        if missing:
            raise SecureAggregationError(f"no shares from {', '.join(missing)} reached this site in round {self.round}")

    def reveal(self, survivors: list[str], dropped: list[str]) -> dict[str, dict[str, str]]:
        """This site's shares of each survivor's seed and each dropped site's mask key, once per round.

        Refuses what would let the coordinator unmask one site: a site named both survivor and dropped, this site
        named dropped, fewer survivors than the threshold, or a second request."""
        if self.revealed:
            raise SecureAggregationError(f"round {self.round}'s shares were asked for twice; this site answers once")
        if set(survivors) & set(dropped):
            raise SecureAggregationError(f"sites {sorted(set(survivors) & set(dropped))} are named both survivor and dropped")
        if self.name not in survivors:
            raise SecureAggregationError("this site is named dropped, yet asked for its shares")
        if len(survivors) < self.threshold:
            raise SecureAggregationError(f"{len(survivors)} survivors are fewer than the threshold of {self.threshold}")
        if not set(survivors) | set(dropped) <= set(self.incoming) | {self.name}:
            raise SecureAggregationError("the unmask request names sites this site exchanged no shares with")
        self.revealed = True
        seeds, keys = {}, {}
        for name in (*survivors, *dropped):
            seed_share, key_share = self.own_shares if name == self.name else self._decrypted(name)
            if name in survivors:
                seeds[name] = seed_share.hex()
            else:
                keys[name] = key_share.hex()
        return {"seeds": seeds, "keys": keys}

    def _decrypted(self, sender: str) -> tuple[bytes, bytes]:
        fernet = Fernet(base64.urlsafe_b64encode(_agreed(self.encryption_key, self.public_keys[sender][0], b"edgekit shares")))
        try:
            payload = json.loads(fernet.decrypt(self.incoming[sender].encode()))
        except (InvalidToken, ValueError):
            raise SecureAggregationError(f"the shares from {sender} do not decrypt with the key agreed with it") from None
        if (payload.get("from"), payload.get("to"), payload.get("round")) != (sender, self.name, self.round):
            raise SecureAggregationError(f"the shares relayed as {sender}'s were made for another site or round")
        return bytes.fromhex(payload["seed"]), bytes.fromhex(payload["key"])


class SiteProtocol:
    """A site's side across rounds: answers the coordinator's stages (``edgekit.federated.site``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current: SiteSecrets | None = None

    def answer(self, request: dict) -> dict:
        """One stage's properties reply to the coordinator's ``request`` (its properties config)."""
        try:
            return self._answer(request)
        except (KeyError, TypeError, ValueError) as error:  # a malformed request: refused, never a crash of the site
            raise SecureAggregationError(f"a malformed secure aggregation request ({type(error).__name__}: {error})") from None

    def _answer(self, request: dict) -> dict:
        stage, round_number = str(request.get("stage")), int(request.get("round", -1))
        if stage == "keys":
            self.current = SiteSecrets(self.name, round_number)
            return {STAGE: _json(self.current.keys())}
        secrets = self._round(round_number)
        if stage == "shares":
            keys = {name: (bytes.fromhex(pair[0]), bytes.fromhex(pair[1])) for name, pair in json.loads(str(request["public_keys"])).items()}
            return {STAGE: _json(secrets.share(keys, int(request["threshold"])))}
        if stage == "unmask":
            return {STAGE: _json(secrets.reveal(json.loads(str(request["survivors"])), json.loads(str(request["dropped"]))))}
        raise SecureAggregationError(f"unknown secure aggregation stage {stage!r}")

    def check(self, instructions: dict) -> None:
        """Whether the fit orders in ``instructions`` can be followed, before the site trains."""
        orders = self._orders(instructions)
        self._round(int(orders["round"])).check_orders(orders["neighbours"], orders["incoming"])

    def masked(self, instructions: dict, update: list[np.ndarray]) -> list[np.ndarray]:
        orders = self._orders(instructions)
        return self._round(int(orders["round"])).masked(update, orders["neighbours"], orders["incoming"])

    def _orders(self, instructions: dict) -> dict:
        try:
            orders = json.loads(str(instructions[STAGE]))
            return {"round": int(orders["round"]), "neighbours": list(orders["neighbours"]), "incoming": dict(orders["incoming"])}
        except (KeyError, TypeError, ValueError) as error:
            raise SecureAggregationError(f"malformed secure aggregation orders ({type(error).__name__}: {error})") from None

    def _round(self, round_number: int) -> SiteSecrets:
        if self.current is None or self.current.round != round_number:
            raise SecureAggregationError(f"no key exchange of round {round_number} happened at this site")
        return self.current


# ---------------------------------------------------------------------------------------------- the coordinator


@dataclass
class RoundExchange:
    """The coordinator's side of one round: the public keys and relayed shares, then the unmasking of the sum."""

    round: int
    threshold: int
    public_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # site → (encryption, mask), hex
    outgoing: dict[str, dict[str, str]] = field(default_factory=dict)  # sender → recipient → ciphertext

    def keys_request(self) -> dict:
        return {STAGE: "keys", "stage": "keys", "round": self.round}

    def took_keys(self, site: str, reply: dict) -> None:
        """Record a site's public keys; a reply that does not hold two X25519 keys is a ValueError (the site sits out)."""
        keys = json.loads(str(reply[STAGE]))
        pair = (str(keys["encryption"]), str(keys["mask"]))
        if any(len(bytes.fromhex(key)) != PUBLIC_KEY_BYTES for key in pair):
            raise ValueError(f"{site}'s public keys are not {PUBLIC_KEY_BYTES} bytes each")
        self.public_keys[site] = pair

    def shares_request(self) -> dict:
        return {STAGE: "shares", "stage": "shares", "round": self.round, "threshold": self.threshold,
                "public_keys": json.dumps(self.public_keys)}

    def took_shares(self, site: str, reply: dict) -> None:
        """Record the ciphertexts a site made for the others; it must have made one for each of them."""
        sent = {str(k): str(v) for k, v in dict(json.loads(str(reply[STAGE]))).items()}
        if set(sent) != set(self.public_keys) - {site}:
            raise ValueError(f"{site} sent shares for {sorted(sent)}, not for every other site of the key exchange")
        self.outgoing[site] = sent

    def neighbours(self) -> list[str]:
        """The sites that finished both exchanges: they mask with each other."""
        return sorted(self.outgoing)

    def fit_orders(self, site: str) -> str:
        neighbours = self.neighbours()
        incoming = {sender: sent[site] for sender, sent in self.outgoing.items() if sender != site and site in sent}
        return _json({"round": self.round, "neighbours": neighbours, "incoming": incoming})

    def unmask_request(self, survivors: list[str]) -> dict:
        dropped = [name for name in self.neighbours() if name not in survivors]
        return {STAGE: "unmask", "stage": "unmask", "round": self.round, "threshold": self.threshold,
                "survivors": json.dumps(sorted(survivors)), "dropped": json.dumps(dropped)}

    def unmasked_sum(self, masked: dict[str, list[np.ndarray]], revealed: dict[str, dict]) -> list[np.ndarray]:
        """The decoded sum of the survivors' updates, from their masked updates and the shares revealed to unmask them."""
        survivors = sorted(masked)
        dropped = [name for name in self.neighbours() if name not in survivors]
        if len(revealed) < self.threshold:
            raise SecureAggregationError(f"{len(revealed)} sites sent their shares; {self.threshold} are needed to unmask the sum")
        shapes = [w.shape for w in next(iter(masked.values()))]
        total = [np.zeros(shape, np.uint64) for shape in shapes]
        for words in masked.values():
            if [w.shape for w in words] != shapes:
                raise SecureAggregationError("the masked updates differ in shapes")
            total = [t + np.asarray(w, np.uint64) for t, w in zip(total, words)]
        for name in survivors:
            seed = self._rebuilt(name, "seeds", revealed)
            total = [t - m for t, m in zip(total, _mask(seed, shapes))]
        for name in dropped:
            key = X25519PrivateKey.from_private_bytes(self._rebuilt(name, "keys", revealed))
            for survivor in survivors:  # the survivor added (or subtracted) a mask shared with the dropped site
                pair = _mask(_agreed(key, bytes.fromhex(self.public_keys[survivor][1]), b"edgekit pairwise mask"), shapes)
                total = [t - p if survivor < name else t + p for t, p in zip(total, pair)]
        return decode(total)

    def _rebuilt(self, site: str, kind: str, revealed: dict[str, dict]) -> bytes:
        shares = []
        for answer in revealed.values():
            try:
                shares.append(bytes.fromhex(answer[kind][site]))
            except (KeyError, TypeError, ValueError):
                continue  # no share (or not one) from this site
        if len(shares) < self.threshold:
            raise SecureAggregationError(f"{len(shares)} shares of {site}'s {kind[:-1]} arrived; {self.threshold} rebuild it")
        try:
            return _combined(shares[:self.threshold])
        except ValueError:
            raise SecureAggregationError(f"the shares of {site}'s {kind[:-1]} do not combine (a site sent a wrong share)") from None


def report(enabled: bool, threshold: int) -> dict:
    """What report.json says about it."""
    if not enabled:
        return {"enabled": False}
    return {"enabled": True, "protocol": PROTOCOL, "threshold": threshold, "fixed_point_bits": FRACTION_BITS,
            "adversary": "an honest-but-curious coordinator, with fewer than threshold sites colluding"}
