"""On/off environment switches of the engine (``LAYERSTREAM_...``): one reading for all of them."""

from __future__ import annotations

import os

OFF = ("0", "off", "false", "no")


def switch_on(name: str, default: bool = True) -> bool:
    """Whether the switch ``name`` is on: off when set to 0 / off / false / no (any case, spaces ignored), on when
    set to anything else, ``default`` when unset."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in OFF
