"""The paper's numbers: the "paper" column of every reproduced table (read from the paper's tables).

Semantic entries are (mIoU, PQ^St); panoptic entries are (PQ, PQ^Th, PQ^St[, SQ, RQ]).
"""

# Table 1, ADE20K val: mIoU single-scale, multi-scale, params (M), FLOPs (G), fps; crop size
TABLE1 = {
    "ade20k-maskformer-r50": dict(ss=44.5, ms=46.7, params=41, flops=53, fps=24.5, size=512),
    "ade20k-maskformer-r101": dict(ss=45.5, ms=47.2, params=60, flops=73, fps=19.5, size=512),
    "ade20k-maskformer-r101c": dict(ss=46.0, ms=48.1, params=60, flops=80, fps=19.0, size=512),
    "ade20k-maskformer-swin-t": dict(ss=46.7, ms=48.8, params=42, flops=55, fps=22.1, size=512),
    "ade20k-maskformer-swin-s": dict(ss=49.8, ms=51.0, params=63, flops=79, fps=19.6, size=512),
    "ade20k-maskformer-swin-b": dict(ss=51.1, ms=52.3, params=102, flops=195, fps=12.6, size=640),
    "ade20k-maskformer-swin-l": dict(ss=54.1, ms=55.6, params=212, flops=375, fps=7.9, size=640),  # IN-22k
}

# Table 2: (mIoU, PQ^St) per dataset; datasets ordered by number of classes
TABLE2_DATASETS = (("cityscapes", 19), ("ade20k", 150), ("coco-stuff", 171), ("ade20k-full", 847))
TABLE2 = {
    "perpixel": {"cityscapes": (77.4, 58.9), "ade20k": (39.2, 21.6), "coco-stuff": (32.4, 15.5), "ade20k-full": (12.4, 5.8)},
    "perpixelplus": {"cityscapes": (78.5, 60.2), "ade20k": (41.9, 28.3), "coco-stuff": (34.2, 24.6), "ade20k-full": (13.9, 9.0)},
    "maskformer": {"cityscapes": (78.5, 63.1), "ade20k": (44.5, 33.4), "coco-stuff": (37.1, 28.9), "ade20k-full": (17.4, 11.9)},
}

# Table 3, COCO panoptic val: PQ, PQ^Th, PQ^St, SQ, RQ, params (M), FLOPs (G), fps
TABLE3 = {
    "coco-panoptic-maskformer-r50": dict(pq=(46.5, 51.0, 39.8, 80.4, 56.8), params=45, flops=181, fps=17.6),
    "coco-panoptic-maskformer-r101": dict(pq=(47.6, 52.5, 40.3, 80.7, 58.0), params=64, flops=248, fps=14.0),
    "coco-panoptic-maskformer-swin-t": dict(pq=(47.7, 51.7, 41.7, 80.4, 58.3), params=42, flops=179, fps=17.0),
    "coco-panoptic-maskformer-swin-s": dict(pq=(49.7, 54.4, 42.6, 80.9, 60.4), params=63, flops=259, fps=12.4),
    "coco-panoptic-maskformer-swin-b": dict(pq=(51.1, 56.3, 43.2, 81.4, 61.8), params=102, flops=411, fps=8.4),
    "coco-panoptic-maskformer-swin-l": dict(pq=(52.7, 58.5, 44.0, 81.8, 63.5), params=212, flops=792, fps=5.2),
}

# Table 3's "MaskFormer (DETR post-processing)" row: the R50 + 6 Enc model read out with DETR's panoptic
# post-processing instead of MaskFormer's; PQ, PQ^Th, PQ^St, SQ, RQ
TABLE3_DETR = {"coco-panoptic-maskformer-r50": (45.6, 50.0, 39.0, 80.2, 55.8)}

# Table 4 (ADE20K, R50): (mIoU, PQ^St)
TABLE4 = {"perpixelplus": (41.9, 28.3), "maskformer-fixed": (43.7, 30.3), "maskformer": (44.2, 33.4)}

# Number of queries (ADE20K): (mIoU, PQ^St); "perpixelplus" is the N=K per-pixel reference
QUERIES = {"perpixelplus": (41.9, 28.3), 20: (42.9, 32.6), 50: (43.9, 32.7), 100: (44.5, 33.4),
           150: (44.2, 33.4), 300: (43.5, 32.3), 1000: (35.4, 26.7)}

# Table 5 (COCO panoptic val, R50 + 6 Enc): PQ, PQ^Th, PQ^St
TABLE5 = {"maskformer-boxmatch": (43.7, 49.2, 35.3), "maskformer": (46.5, 51.0, 39.8)}

# Table VII (ADE20K): mIoU, PQ^St, SQ^St, RQ^St
TABLE7 = {"perpixelplus": (41.9, 28.3, 71.9, 36.2), "general": (42.4, 34.2, 74.4, 43.5),
          "semantic": (44.5, 33.4, 75.4, 42.4)}

# Table VIII (ADE20K): semantic mIoU, PQ^St, SQ^St, RQ^St; panoptic PQ, PQ^Th, PQ^St, SQ, RQ
TABLE8 = {"1 layer": ((43.0, 31.1, 74.3, 39.7), (31.9, 29.6, 36.6, 76.6, 39.6)),
          "6 layers": ((44.5, 33.4, 75.4, 42.4), (34.7, 32.2, 39.7, 76.7, 42.8)),
          "6 layers, no self-attention": ((44.6, 32.8, 74.5, 41.5), (32.6, 29.9, 38.2, 75.6, 40.4))}
