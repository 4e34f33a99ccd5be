"""The embedded default dataset: procedurally drawn shapes with generated captions.

:func:`generate_shapes` writes ``dataset_shapes.json`` in the Karpathy-split format plus PNGs under
``images/NNNN/`` (at most 1000 per folder), so the data goes through
:func:`gcr.data.karpathy.load_karpathy` like Flickr30K or COCO. Each scene has 1 to 3 shapes
(kind, colour, size, position) on a textured, coloured background. Each of its five captions states a
random subset of facts about the scene; the facts are stored as structured claims next to the caption
(``gcr_claims``), and the scene itself next to the image (``gcr_scene``), so that
:func:`caption_ambiguity` can tell, from the JSON alone, how many images each caption fits.

Claims (all keys optional): ``{"objects": [{"kind", "color", "size"}...], "relations": [[i, rel, j]...],
"count": n, "background": colour, "texture": texture}``. A scene satisfies them when distinct shapes
match the objects (each given attribute equal), every relation ``objects[i] rel objects[j]`` holds
(``rel`` in left/right/above/below: the centres differ by at least ``relation_margin_px`` along that
axis), it has exactly ``count`` shapes and the given background colour and texture.

The package holds one concept per module: :mod:`~gcr.data.shapes.scenes` (vocabulary and scene
sampling), :mod:`~gcr.data.shapes.rendering` (pixels and PNG bytes), :mod:`~gcr.data.shapes.captions`
(caption text and claims), :mod:`~gcr.data.shapes.ambiguity` (:func:`caption_ambiguity`) and
:mod:`~gcr.data.shapes.generate` (writing the JSON and image folders).
"""

from gcr.data.shapes.ambiguity import caption_ambiguity
from gcr.data.shapes.captions import CAPTIONS_PER_IMAGE
from gcr.data.shapes.generate import (
    FILES_PER_FOLDER,
    FORMAT_VERSION,
    IMAGES_DIR,
    JSON_NAME,
    generate_shapes,
    read_header,
)
from gcr.data.shapes.scenes import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    MAX_OBJECTS,
    RELATION_MARGIN,
    RELATIONS,
    SIZES,
    TEXTURES,
    Claims,
    Scene,
    relations,
)

__all__ = [
    "BACKGROUNDS",
    "CAPTIONS_PER_IMAGE",
    "COLORS",
    "FILES_PER_FOLDER",
    "FORMAT_VERSION",
    "IMAGES_DIR",
    "JSON_NAME",
    "KINDS",
    "MAX_OBJECTS",
    "RELATIONS",
    "RELATION_MARGIN",
    "SIZES",
    "TEXTURES",
    "Claims",
    "Scene",
    "caption_ambiguity",
    "generate_shapes",
    "read_header",
    "relations",
]
