"""How well a run's aligned query space lets indexing on images transfer to text queries (docs/benchmarks.md#levers).

Reads the dense baseline a ``model=compact`` run saved beside its backbone and the run's data, and prints, over
the test split: the dense T2I R@1, the mean cosine of a test caption to its own image, to its nearest train
caption, and of an image to its nearest other image, and the modality gap ``|mean text - mean image|``.

    PYTHONPATH=. python benchmarks/aligned_space.py RUN_FOLDER [DATA_JSON IMAGE_ROOT]

``DATA_JSON``/``IMAGE_ROOT`` default to the shapes data a default run generates (``data/shapes-1000-s0``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def load_dense(directory: Path):
    """The saved dense baseline, CLIP-style or frozen-tower."""
    from gcr.dense.frozen import FROZEN_DENSE_FILE, FrozenTowerDualEncoder
    from gcr.dense.models import DualEncoder

    if (directory / FROZEN_DENSE_FILE).is_file():
        return FrozenTowerDualEncoder.from_pretrained(directory)
    return DualEncoder.from_pretrained(directory)


@torch.no_grad()
def main(argv: list[str]) -> int:
    from gcr.data.karpathy import load_karpathy

    if not argv:
        print(__doc__)
        return 2
    run = Path(argv[0])
    data = Path(argv[1]) if len(argv) > 1 else Path("data/shapes-1000-s0/dataset_shapes.json")
    root = Path(argv[2]) if len(argv) > 2 else data.parent
    dense = load_dense(run / "t2i" / "backbone" / "dense").eval()
    corpus = load_karpathy(data, root, check_images="exists")

    def encode(fn, values, step=128):
        return torch.cat([fn(values[i : i + step]) for i in range(0, len(values), step)])

    images = {s: corpus.split(s) for s in ("train", "test")}
    image = {s: encode(dense.encode_images, [str(im.path) for im in images[s]]) for s in images}
    caps = {s: corpus.captions(s) for s in images}
    text = {s: encode(dense.encode_text, [c.text for c in caps[s]], 256) for s in images}
    column = {im.image_id: j for j, im in enumerate(images["test"])}
    own = torch.tensor([column[c.image_id] for c in caps["test"]])
    sim = text["test"] @ image["test"].T
    rows = torch.arange(len(own))
    between_images = image["test"] @ image["test"].T
    between_images.fill_diagonal_(-2.0)
    print(f"run: {run}")
    print(f"dense T2I R@1 over the {len(images['test'])} test images: {100 * (sim.argmax(1) == own).float().mean():.1f}")
    print(f"cos(test caption, own image):            {sim[rows, own].mean():.3f}")
    print(f"cos(test caption, nearest train caption): {(text['test'] @ text['train'].T).max(1).values.mean():.3f}")
    print(f"cos(test image, nearest other test image): {between_images.max(1).values.mean():.3f}")
    print(f"modality gap |mean text - mean image| (train): {(text['train'].mean(0) - image['train'].mean(0)).norm():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
