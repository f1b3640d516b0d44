"""Evaluation tooling around the ``gwq_compile`` library, kept out of it: the peer methods the
quality benchmark compares GWQ with (:mod:`gwq_tools.peers`: RTN, GPTQ, AWQ, torchao;
:mod:`gwq_tools.awq`: AWQ's scale search).  Benchmarks and tests use it; the library never does."""
