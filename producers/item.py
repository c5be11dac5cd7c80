"""What every producer hands to the sender: one frame and what travels with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Item:
    """One frame to send: data (P, H, W) or (H, W), its meta (scalars), optionally its ground
    truth (for the caller's `on_sent`) and a timestamp to send instead of the send time."""

    data: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    truth: Any = None
    timestamp_ns: int | None = None
