"""The networks of the paper (Sec. 3.3, Fig. 2): backbones, pixel decoder, transformer decoder, and the
MaskFormer / per-pixel baseline models built from them."""
