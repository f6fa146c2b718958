"""Feature maps of one image, level by level, as a PNG grid.

Run: python examples/show_feature_maps.py IMAGE [--model convnext_tiny] [--output grid.png]
"""

from __future__ import annotations

import argparse

import unifeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--output", default="feature_maps.png")
    parser.add_argument("--channels", type=int, default=8)
    args = parser.parse_args()
    model = unifeat.create_model(args.model, features_only=True)
    picture = unifeat.plot_feature_maps(model, args.image, args.output, channels=args.channels)
    print(
        f"{args.output}: {picture.size[0]}x{picture.size[1]}, "
        f"levels {model.feature_info.out_indices}"
    )


if __name__ == "__main__":
    main()
