"""Does the embedded model's VAE keep the personal looks? (docs/BENCHMARKS.md, personalized segmentation)

Encodes and decodes training photos of every look (``attnseg.shapes.personal``) and prints the mean colour of the
pattern's pixels before and after, with the fill's for comparison; ``--out`` writes the photos above their
reconstructions.

    python scripts/vae_looks.py [--out looks.png]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.personal import training_photos
from attnseg.shapes.world import LOOKS, PATTERN_COLOUR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=4, help="photos per look")
    a = ap.parse_args()
    torch.set_num_threads(1)
    vae = AttnSegPredictor.from_pretrained().pipe.vae
    print(f"pattern colour {tuple(int(c) for c in PATTERN_COLOUR)}\n")
    print("| look | pattern pixels, photo | pattern pixels, reconstruction |\n|---|---|---|")
    rows = []
    for look in LOOKS:
        photos = training_photos(look, "circle", a.n, 0)
        x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
        recon = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        near = np.abs(np.stack(photos).astype(int) - PATTERN_COLOUR.astype(int)).max(-1) <= 30  # the pattern's pixels
        before, after = np.stack(photos)[near].mean(0), recon[near].mean(0)
        print(f"| {look} | {tuple(int(c) for c in before)} | {tuple(int(c) for c in after)} |")
        rows.append(np.concatenate([np.concatenate(photos, 1), np.concatenate(list(recon), 1)], 0))
    if a.out:
        Image.fromarray(np.concatenate(rows, 0)).save(a.out)


if __name__ == "__main__":
    main()
