"""Evaluation: the suite of the ``eval`` config section (``suite.py``) and its evaluators (``zeroshot.py``,
``image_text_retrieval.py``, ``probes.py``, ``captioning.py``), and the metrics they share (``retrieval.py``,
``caption_metrics.py``, ``templates.py``, ``image_folder.py``)."""
