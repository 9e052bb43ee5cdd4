"""Class names of the real semantic-segmentation benchmarks, in contiguous-id order.

Panoptic datasets (COCO, ADE20K panoptic) read their categories from their JSON files instead.
ADE20K-Full has 847 classes whose WordNet-style names are not reproduced here; its reader
names them "ade20k_full_<id>".
"""
from __future__ import annotations


def _split(text: str) -> tuple[str, ...]:
    """Names are listed one per comma so that the lists stay compact and easy to proof-read."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


# ADE20K SceneParsing (objectInfo150 order); file label i+1 -> contiguous id i.
ADE20K_150_CLASSES = _split(
    "wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk,"
    "person, earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa,"
    "shelf, house, sea, mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp,"
    "bathtub, railing, cushion, base, box, column, signboard, chest of drawers, counter, sand,"
    "sink, skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway, case,"
    "pool table, pillow, screen door, stairway, river, bridge, bookcase, blind, coffee table,"
    "toilet, flower, book, hill, bench, countertop, stove, palm, kitchen island, computer,"
    "swivel chair, boat, bar, arcade machine, hovel, bus, towel, light, truck, tower,"
    "chandelier, awning, streetlight, booth, television receiver, airplane, dirt track,"
    "apparel, pole, land, bannister, escalator, ottoman, bottle, buffet, poster, stage, van,"
    "ship, fountain, conveyer belt, canopy, washer, plaything, swimming pool, stool, barrel,"
    "basket, waterfall, tent, bag, minibike, cradle, oven, ball, food, step, tank, trade name,"
    "microwave, pot, animal, bicycle, lake, dishwasher, screen, blanket, sculpture, hood,"
    "sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate, monitor,"
    "bulletin board, shower, radiator, glass, clock, flag"
)

# COCO-Stuff: the 80 COCO thing classes followed by the 91 stuff classes (171 in all).
COCO_THING_CLASSES = _split(
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light,"
    "fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant,"
    "bear, zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard,"
    "sports ball, kite, baseball bat, baseball glove, skateboard, surfboard, tennis racket,"
    "bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange,"
    "broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed,"
    "dining table, toilet, tv, laptop, mouse, remote, keyboard, cell phone, microwave, oven,"
    "toaster, sink, refrigerator, book, clock, vase, scissors, teddy bear, hair drier, toothbrush"
)
COCO_STUFF_ONLY_CLASSES = _split(
    "banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard, carpet,"
    "ceiling-other, ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain,"
    "desk-stuff, dirt, door-stuff, fence, floor-marble, floor-other, floor-stone, floor-tile,"
    "floor-wood, flower, fog, food-other, fruit, furniture-other, grass, gravel, ground-other,"
    "hill, house, leaves, light, mat, metal, mirror-stuff, moss, mountain, mud, napkin, net,"
    "paper, pavement, pillow, plant-other, plastic, platform, playingfield, railing, railroad,"
    "river, road, rock, roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow,"
    "solid-other, stairs, stone, straw, structural-other, table, tent, textile-other, towel,"
    "tree, vegetable, wall-brick, wall-concrete, wall-other, wall-panel, wall-stone, wall-tile,"
    "wall-wood, water-other, waterdrops, window-blind, window-other, wood"
)
COCO_STUFF_171_CLASSES = COCO_THING_CLASSES + COCO_STUFF_ONLY_CLASSES
COCO_STUFF_171_THING_IDS = tuple(range(len(COCO_THING_CLASSES)))

# Cityscapes train ids 0..18 (cityscapesScripts' labels.py); 11..18 are the instance classes.
CITYSCAPES_19_CLASSES = _split(
    "road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation,"
    "terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle"
)
CITYSCAPES_19_THING_IDS = tuple(range(11, 19))

# Mapillary Vistas v1.2: labels 0..64; label 65 is "unlabeled" (-> ignore).
MAPILLARY_VISTAS_65_CLASSES = _split(
    "Bird, Ground Animal, Curb, Fence, Guard Rail, Barrier, Wall, Bike Lane, Crosswalk - Plain,"
    "Curb Cut, Parking, Pedestrian Area, Rail Track, Road, Service Lane, Sidewalk, Bridge,"
    "Building, Tunnel, Person, Bicyclist, Motorcyclist, Other Rider, Lane Marking - Crosswalk,"
    "Lane Marking - General, Mountain, Sand, Sky, Snow, Terrain, Vegetation, Water, Banner,"
    "Bench, Bike Rack, Billboard, Catch Basin, CCTV Camera, Fire Hydrant, Junction Box,"
    "Mailbox, Manhole, Phone Booth, Pothole, Street Light, Pole, Traffic Sign Frame,"
    "Utility Pole, Traffic Light, Traffic Sign (Back), Traffic Sign (Front), Trash Can,"
    "Bicycle, Boat, Bus, Car, Caravan, Motorcycle, On Rails, Other Vehicle, Trailer, Truck,"
    "Wheeled Slow, Car Mount, Ego Vehicle"
)

ADE20K_FULL_NUM_CLASSES = 847


# ----------------------------------------------------------------------------- dataset names
# The one spelling of every dataset: presets (`<dataset>-<model>-<backbone>`), TrainConfig.dataset, the
# readers (`build_dataset`), the datasets' `.name`, and the sub-folders of a paper run's data_root.
DATASET_NAMES = ("ade20k", "ade20k-full", "coco-stuff", "cityscapes", "mapillary", "coco-panoptic",
                 "ade20k-panoptic", "synthetic", "synthetic-panoptic", "custom")
# the generated scenes (mfcore.data.synthetic_writer)
SYNTHETIC = ("synthetic", "synthetic-panoptic")
# the datasets whose K and class names come from their files, not from a preset: the generated scenes and
# your own data (`custom`, data/README.md); a run on one of them takes the data's K
CLASSES_FROM_DATA = SYNTHETIC + ("custom",)
# Former spellings (the readers' old registry keys, still in older synthetic_meta.json files and
# notebooks): resolved here, and nowhere else.
DATASET_ALIASES = {"ade20k_full": "ade20k-full", "coco_stuff_10k": "coco-stuff", "coco_stuff": "coco-stuff",
                   "mapillary_vistas": "mapillary", "coco_panoptic": "coco-panoptic",
                   "ade20k_panoptic": "ade20k-panoptic", "synthetic_semantic": "synthetic",
                   "synthetic_panoptic": "synthetic-panoptic"}


def dataset_name(name: str) -> str:
    """The one spelling of a dataset name: itself, or the name a former spelling stands for; any other
    name is a ValueError listing the valid ones."""
    if name in DATASET_NAMES:
        return name
    if name in DATASET_ALIASES:
        return DATASET_ALIASES[name]
    raise ValueError(f"unknown dataset {name!r}; datasets: {', '.join(DATASET_NAMES)} (former spellings "
                     f"{', '.join(sorted(DATASET_ALIASES))} are accepted)")
