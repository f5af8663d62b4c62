"""Per-link compression for `network.compression = "auto"`: what a link's measured bandwidth says
about how activations should travel on it. Pure: no sockets, no clocks."""

from __future__ import annotations

MIN_SAMPLE_BYTES = 64 * 1024
"""Transfers smaller than this say more about latency than bandwidth and are not used."""


class LinkEstimate:
    """Exponential moving average of a link's throughput (Mbit/s), fed with the transfer times of
    reply tensors: from the reply message to the tensor's last byte, when nothing but the network
    stands between the two (the server sends them back to back)."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.mbps: float | None = None

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes < MIN_SAMPLE_BYTES or seconds <= 0:
            return
        sample = nbytes * 8 / seconds / 1e6
        self.mbps = sample if self.mbps is None else (1 - self.alpha) * self.mbps + self.alpha * sample


def choose_compression(setting: str, mbps: float | None, *, fp16_below: float, int8_below: float) -> str:
    """The encoding for the next call: `setting` itself unless it is `auto`; for `auto`, `none`
    until the link is measured and on links at least `fp16_below` Mbit/s fast, `int8` below
    `int8_below`, `fp16` in between."""
    if setting != "auto":
        return setting
    if mbps is None or mbps >= fp16_below:
        return "none"
    return "int8" if mbps < int8_below else "fp16"
