"""cryolatent: unsupervised rotation/translation-invariant representations of cryo-EM particles.

The library is usable without the CLI; ``cryolatent.cli`` is a thin layer over it.
"""

__version__ = "0.1.0"
