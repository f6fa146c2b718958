"""Descriptor extraction over a folder and nearest-neighbour retrieval.

Run: python examples/retrieval.py FOLDER [--model resnet50] [--random-init]

Extracts one pooled descriptor per image with ``unifeat.extract`` (resumable,
sharded safetensors), L2-normalizes them, and prints each query's nearest
images by cosine similarity.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import unifeat


def nearest(
    folder: str | Path, output: str | Path, model: str = "resnet50", k: int = 3, **kwargs
) -> dict[str, list[tuple[str, float]]]:
    """For every image in ``folder``, its ``k`` nearest other images (path, cosine)."""
    result = unifeat.extract(model, [folder], output, out_indices=(-1,), progress=False, **kwargs)
    features = unifeat.load_features(result.index_path)
    (level,) = [key for key in features if key.startswith("level_")]
    descriptors = torch.nn.functional.normalize(features[level], dim=1)
    similarity = descriptors @ descriptors.T
    similarity.fill_diagonal_(-1.0)
    scores, order = similarity.topk(min(k, len(descriptors) - 1), dim=1)
    paths = features["paths"]
    return {
        paths[i]: [(paths[j], float(s)) for j, s in zip(order[i], scores[i], strict=True)]
        for i in range(len(paths))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--output", default="descriptors.safetensors")
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--random-init", action="store_true", help="random weights (a demo)")
    args = parser.parse_args()
    weights = {"random_init": True} if args.random_init else {"pretrained": True}
    for query, hits in nearest(args.folder, args.output, args.model, args.k, **weights).items():
        print(query)
        for path, score in hits:
            print(f"    {score:.3f}  {path}")


if __name__ == "__main__":
    main()
