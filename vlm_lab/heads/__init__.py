"""Heads: the model code that sits on the towers' outputs. Importing this package registers them.

* ``projection.py``: projection heads into the joint embedding space (``linear``, ``mlp``, ``identity``);
* ``pooling.py``: attentional poolers (learned queries over a tower's tokens);
* ``coca.py``: CoCa's caption head (``coca_decoder``): two poolers and the multimodal text decoder.
"""

from vlm_lab.heads.coca import CocaCaptionHead, DecoderCache, MultimodalDecoderLayer, build_caption_head
from vlm_lab.heads.pooling import AttentionalPooler
from vlm_lab.heads.projection import IdentityHead, LinearHead, MLPHead

__all__ = ["AttentionalPooler", "CocaCaptionHead", "DecoderCache", "IdentityHead", "LinearHead", "MLPHead",
           "MultimodalDecoderLayer", "build_caption_head"]
