"""Does a concept learned by ``attnseg personalize`` find its object in new scenes? (docs/BENCHMARKS.md)

One look (default: striped circles) is learned from its training photos as the CLI learns it (``learn_concept``, the
default settings), then every test scene of another world seed that holds exactly one object of that look is
queried for it alone, three ways: colour and token ("a red <my-striped> circle"), the token alone, and the colour
alone; and, learning nothing, the look in words ("a red striped circle"), which a model whose captions named the
looks (``train-toy --look-word-prob``) may know. A hit: the object gets the most mask pixels of all the scene's objects. Prints hits / scenes and the mean IoU
of the mask with the object, per query; chance is about one in the scene's object count. Beside them, the hits the
same attribution maps would give with the scene's true objects as the segments (each query's map averaged over
each object's cells of the attention grid; the best object is its pick): what the segmentation loses. With ``--colour`` the
photos show one object always in that colour (a user's own object, its colour part of its look) and the scenes
counted are those with exactly one object of that colour and look.

    python scripts/check_personal_scene.py --out /tmp/personal-check --look striped --seed 7 --n 60
    python scripts/check_personal_scene.py --out /tmp/personal-check --look striped --colour red --seed 7 --n 400
    python scripts/check_personal_scene.py --out /tmp/personal-check --look striped --seed 7 --n 200 --contrast 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnseg.methods.personal import PERSONAL_PRESETS, iou
from attnseg.predictor import AttnSegPredictor
from attnseg.shapes.personal import test_scene, training_photos
from attnseg.train.personalize import PersonalizeConfig, learn_concept, settings_digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder of the learned concept")
    ap.add_argument("--look", default="striped")
    ap.add_argument("--shape", default="circle")
    ap.add_argument("--seed", type=int, default=7, help="world seed of the test scenes (the benchmark's is 1)")
    ap.add_argument("--n", type=int, default=60, help="scenes looked at (those with exactly one object of the look count)")
    ap.add_argument("--method", default="textual-inversion", choices=["textual-inversion", "custom-diffusion"])
    ap.add_argument("--colour", default=None, help="learn one object of this colour (default: the look in every colour)")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--preset", default="default", choices=sorted(PERSONAL_PRESETS), help="segmentation preset")
    ap.add_argument("--contrast", type=float, default=1.0, help="weight of the contrastive attention loss (0: off)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    name = f"my-{a.colour}-{a.look}" if a.colour else f"my-{a.look}"
    token = f"<{name}>"
    cfg = PersonalizeConfig(method=a.method, contrast_weight=a.contrast)
    concept = a.out / f"{name}-{settings_digest(cfg)}.safetensors"  # one file per learning settings
    if not concept.is_file():
        learner = AttnSegPredictor.from_pretrained(a.model)
        photos = training_photos(a.look, a.shape, 8, 0, colour=a.colour)
        learn_concept(learner.pipe, photos, token, a.shape, concept, cfg)
    pred = AttnSegPredictor.from_pretrained(a.model)
    pred.load_concept(concept)
    queries = {
        "colour and token": "a {c} {t} {s}",
        "token alone": "a {t} {s}",
        "colour alone": "a {c} {s}",
        "colour and look word": "a {c} {look} {s}",
    }
    hits = dict.fromkeys(queries, 0)
    true_hits = dict.fromkeys(queries, 0)
    ious: dict[str, list[float]] = {k: [] for k in queries}
    scenes = 0
    for i in range(a.n):
        sc = test_scene(i, a.seed, a.shape)
        mine = [q for q, o in enumerate(sc.objects) if o.look == a.look and a.colour in (None, o.obj.colour)]
        if len(mine) != 1:
            continue
        scenes += 1
        q = mine[0]
        pred.set_image(sc.image)
        for name, tpl in queries.items():
            query = tpl.format(c=sc.objects[q].obj.colour, t=token, s=a.shape, look=a.look)
            mask = pred.segment_personal([query], a.shape, PERSONAL_PRESETS[a.preset]).mask == 1
            cover = [int((mask & (sc.instance == j + 1)).sum()) for j in range(len(sc.objects))]
            hits[name] += int(max(cover) > 0 and int(np.argmax(cover)) == q)
            ious[name].append(iou(mask, sc.instance == q + 1))
            pm = pred.personal_maps([query], a.shape, PERSONAL_PRESETS[a.preset])
            inst = torch.from_numpy(sc.instance.astype(np.int64))
            cells = [
                F.adaptive_avg_pool2d((inst == j + 1).float()[None, None], pm.grid).flatten() for j in range(len(sc.objects))
            ]
            means = [float((pm.instance[0] * c).sum() / c.sum().clamp_min(1e-6)) for c in cells]
            true_hits[name] += int(int(np.argmax(means)) == q)
    print(f"{scenes} scenes of world seed {a.seed} with one {a.colour or ''} {a.look} {a.shape}; concept {concept}\n")
    print("| query | hits | mean IoU with the object | hits with the true objects as segments |\n|---|---|---|---|")
    for name in queries:
        print(f"| {name} | {hits[name]} / {scenes} | {100 * np.mean(ious[name]):.1f} | {true_hits[name]} / {scenes} |")


if __name__ == "__main__":
    main()
