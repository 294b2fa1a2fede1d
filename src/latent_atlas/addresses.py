"""One name per tensor: ``resid.03`` is the store's ``/resid/03``, a lens target and a figure label.

``resid.00`` is the embedding output (the input of block 1), ``resid.{l}`` the output of block ``l``
(the raw residual stream, before any final norm), and ``ln_final`` the output of the final norm, i.e.
what the unembedding reads.
"""

import re

RESID = "resid"
LN_FINAL = "ln_final"
_RESID_PATTERN = re.compile(r"^resid\.(\d{2,3})$")


def resid_address(layer: int) -> str:
    """Return the address of the residual stream after ``layer`` blocks, e.g. ``resid.03``."""
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return f"{RESID}.{layer:02d}"


def parse_resid_address(address: str) -> int:
    """Return the layer of a ``resid.{layer:02d}`` address.

    Raises:
        ValueError: if the address is not of that form.
    """
    match = _RESID_PATTERN.match(address)
    if match is None:
        raise ValueError(f"not a residual address: {address!r} (expected e.g. 'resid.03')")
    return int(match.group(1))


def store_dataset(address: str) -> str:
    """Return the HDF5 dataset path for an address: ``resid.03`` → ``/resid/03``."""
    if address == LN_FINAL:
        return f"/{LN_FINAL}"
    layer = parse_resid_address(address)
    return f"/{RESID}/{layer:02d}"
