"""Tooling around the ``gwq_compile`` library, kept out of it (the library never imports it):

* :mod:`gwq_tools.cli`: the ``gwq`` command (``gwq eval``, ``gwq quantize``);
* :mod:`gwq_tools.eval`: perplexity with the standard protocol, and its text sources;
* :mod:`gwq_tools.data`: WikiText-2 from ``../shared/data`` on top of the library's calibration text;
* :mod:`gwq_tools.models`: offline model loading (the SmolLM2 GGUF wheel, GGUF files, HF folders);
* :mod:`gwq_tools.peers` and :mod:`gwq_tools.awq`: the methods the quality benchmark compares GWQ with.
"""
