"""``cryolatent report``: one self-contained HTML page of an embedding, and the selection
files it saves.

- :func:`cryolatent.report.build.make_report` writes the page (a Bokeh WebGL scatter of the
  latent map with its JavaScript inline, the class gallery with the trust report, the
  generator's traversals; no server, no network);
- :mod:`cryolatent.report.selection` reads the selection files the page saves and turns them
  into particle subsets (``cryolatent select IN.star --selection FILE -o SUBSET.star``).

This package imports neither torch nor Bokeh at import time (``select`` stays light).
"""
