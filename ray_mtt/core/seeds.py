"""Every source of randomness gets its own stream, derived from (seed, purpose, index).

Before this, expert k was seeded with seed * 1_000_003 + k and evaluation network r with
seed * 1000 + r, so with seed 0 the first evaluation networks started at exactly the experts'
initial weights: the very points the synthetic set was trained to move, which inflated every
score. Hashing the purpose into the seed makes such collisions impossible by construction.
"""
from __future__ import annotations

import hashlib

import torch

# The purposes in use; a new one is a new, independent stream.
PURPOSES = ("expert_init", "expert_epoch", "expert_order", "distill_init", "distill_iteration", "validation", "evaluation",
            "random_real", "difficulty_init", "difficulty_epoch", "difficulty_order")


def derive_seed(seed: int, purpose: str, *index: int) -> int:
    """A 31-bit seed for (seed, purpose, index...): equal inputs give equal seeds, any difference a new
    one (31 bits: every consumer, numpy and FFCV's traversal included, takes it as it is)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream {purpose!r}; add it to seeds.PURPOSES")
    key = "/".join([str(seed), purpose, *map(str, index)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") >> 1


def generator(seed: int, purpose: str, *index: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose, *index))


def seed_everything(seed: int, purpose: str, *index: int) -> int:
    """Seed torch's global generators (CPU and CUDA) from one stream; returns the seed. Used where
    library code (nn.Module init, DSA draws inside a training loop) reads the global generator."""
    derived = derive_seed(seed, purpose, *index)
    torch.manual_seed(derived)
    return derived
