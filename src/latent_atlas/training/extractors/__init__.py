"""Format readers and extractors: the files of one Debian package -> raw documents.

One module per source format (:mod:`.kjv`, :mod:`.dictd`, :mod:`.man`, :mod:`.html`, :mod:`.fortunes`),
sharing :mod:`.common`. :data:`EXTRACTORS` maps each extractor name a source may use (its ``extractor`` key)
to a function taking the selected files and the source's options and yielding documents.
"""

from latent_atlas.training.extractors.common import Extractor
from latent_atlas.training.extractors.dictd import extract_dictd
from latent_atlas.training.extractors.fortunes import extract_fortunes
from latent_atlas.training.extractors.html import extract_html
from latent_atlas.training.extractors.kjv import extract_kjv
from latent_atlas.training.extractors.man import extract_man

EXTRACTORS: dict[str, Extractor] = {
    "kjv": extract_kjv,
    "dictd": extract_dictd,
    "man": extract_man,
    "html": extract_html,
    "fortunes": extract_fortunes,
}
