"""reident-submit: CLIP-ReIdent player re-identification, from crops to a challenge ranking file."""

__version__ = "0.1.0"
