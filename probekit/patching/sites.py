"""Where a patch acts: site names (TransformerLens's), `Component` and `PathPatch`.

A location is a value: a `Component` is ``(site, layer, head, pos)`` with ``head``/``pos`` None meaning
all heads / all positions; a `PathPatch` is a sender head and one receiver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from probekit.forward import HEAD_SITES, SITES
from probekit.tasks import ProbekitError

BLOCK_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SITE_ALIASES = {"head": "z", "head_out": "z", "hook_z": "z", "attn": "attn_out", "mlp": "mlp_out",
                "resid": "resid_pre", "attn_pattern": "pattern"}
# sub-stage of a layer at which a site is read; a patch run can start there from the cache
STAGE = {"resid_pre": 0, "q": 1, "k": 1, "v": 1, "pattern": 2, "z": 3, "attn_out": 4, "resid_mid": 5,
         "mlp_out": 6, "resid_post": 7}
RECEIVERS = ("q", "k", "v", "logits")
Direction = Literal["denoise", "noise"]


def canonical_site(site: str) -> str:
    """The site name for ``site`` or one of its aliases (``head`` -> ``z``); refuses an unknown site."""
    s = SITE_ALIASES.get(str(site), str(site))
    if s not in SITES:
        raise ProbekitError(f"unknown site {site!r}; expected one of {list(SITES)} or an alias {sorted(SITE_ALIASES)}")
    return s


@dataclass(frozen=True)
class Component:
    """One activation to patch. ``head``/``pos`` None: all heads / all positions (pos = query pos for patterns)."""

    site: str
    layer: int
    head: int | None = None
    pos: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", canonical_site(self.site))
        if self.head is not None and self.site not in HEAD_SITES:
            raise ProbekitError(f"site {self.site!r} has no heads; got head={self.head} (expected None)")

    @property
    def label(self) -> str:
        s = f"{self.site}.L{self.layer}"
        if self.head is not None:
            s += f".H{self.head}"
        return s + (f"@{self.pos}" if self.pos is not None else "")


@dataclass(frozen=True)
class PathPatch:
    """Sender head -> one receiver: a later head's ``q``/``k``/``v`` input, or the ``logits`` (direct path)."""

    sender_layer: int
    sender_head: int
    receiver: str = "logits"
    receiver_layer: int | None = None
    receiver_head: int | None = None
    sender_pos: int | None = None

    def __post_init__(self):
        if self.receiver not in RECEIVERS:
            raise ProbekitError(f"unknown path receiver {self.receiver!r}; expected one of {list(RECEIVERS)}")
        if self.receiver != "logits":
            if self.receiver_layer is None or self.receiver_head is None:
                raise ProbekitError(f"path receiver {self.receiver!r} needs receiver_layer and receiver_head")
            if self.receiver_layer <= self.sender_layer:
                raise ProbekitError(f"receiver layer {self.receiver_layer} must be after the sender layer {self.sender_layer}")

    @property
    def label(self) -> str:
        s = f"L{self.sender_layer}.H{self.sender_head}" + (f"@{self.sender_pos}" if self.sender_pos is not None else "")
        if self.receiver == "logits":
            return s + "->logits"
        return s + f"->L{self.receiver_layer}.H{self.receiver_head}.{self.receiver}"


Patch = Component | PathPatch
