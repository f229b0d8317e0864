"""starpo: align language models end to end (SFT, offline *PO, online DPO, evaluation)."""

__version__ = "0.1.0"
