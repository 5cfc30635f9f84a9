"""Is the pointing game limited by the CAM's resolution? The same checkpoints, mapped at the last
feature block (what the cycle uses) and one block earlier (twice the resolution).

    python bench/cam_depth.py outputs/<cycle run> [--archs resnet18] [--n 120]

For every finished cycle of each architecture: CAMs on the first n PNEUMONIA test films (lesion
masks from the phantom tree), lesion pointing game, lung and lesion energy share, at depth 0 (the
output of `.features`) and depth 1 (`cam.depth=1`: the last block moved into the head).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cycle.cam import at_depth, compute_cam  # noqa: E402
from cycle.checkpoint import load_classifier  # noqa: E402
from cycle.data.phantom import load_mask  # noqa: E402
from cycle.data.records import ScanResult, records_of  # noqa: E402
from cycle.data.transforms import load_grayscale  # noqa: E402
from cycle.localization import localization_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--archs", nargs="+", default=["resnet18"])
    parser.add_argument("--n", type=int, default=120)
    args = parser.parse_args()
    test = [
        r
        for r in records_of(ScanResult.load(args.run / "records.json").records, "test")
        if r.label == 1
    ]
    test = test[: args.n]
    print(
        "| arch | cycle | depth | map | pointing | lung share | lesion share |\n"
        "|---|---|---|---|---|---|---|"
    )
    for arch in args.archs:
        cycles = [p for p in args.run.glob("cycle_*") if p.is_dir()]
        for cycle_dir in sorted(cycles, key=lambda p: int(p.name.split("_")[1])):
            checkpoint = cycle_dir / arch / "train" / "best.pt"
            if not checkpoint.is_file():
                continue
            model, pre = load_classifier(checkpoint)
            films = [pre.resize(load_grayscale(r.path)) for r in test]
            x = torch.stack([pre.normalise(pre.crop(f)) for f in films])
            lesions = np.stack([pre.crop_mask(load_mask(r.path, "lesions")) for r in test])
            lungs = np.stack([pre.crop_mask(load_mask(r.path, "lungs")) for r in test])
            for depth in (0, 1):
                probe = at_depth(model, depth)
                with torch.no_grad():
                    side = probe.features(x[:1]).shape[-1]
                values = localization_metrics(
                    compute_cam(model, x, batch_size=32, depth=depth).numpy(), lungs, lesions
                )
                print(
                    f"| {arch} | {cycle_dir.name.split('_')[1]} | {depth} | {side}x{side} | "
                    f"{np.nanmean(values['lesion_pointing_game']):.3f} | "
                    f"{np.nanmean(values['lung_energy_share']):.3f} | "
                    f"{np.nanmean(values['lesion_energy_share']):.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
