"""SEEM's own model and forward, run in the environment that the SEEM recipe builds.

    python seem_reference.py SEEM_ROOT CONFIG TOKENIZER CHECKPOINT IMAGES OUT --prompts a,b
        [--short-side N] [--seed S]

Builds SEEM from CONFIG (``modeling.build_model``) with random weights (torch seed S), writes
them to CHECKPOINT as SEEM's own ``BaseModel.save_pretrained`` does (the network's state dict),
loads them back through ``BaseModel.from_pretrained``, embeds the prompts (+ "background", the
no-object slot) with ``get_text_embeddings(..., is_eval=True)``, and for every image in the
folder IMAGES (PNG files) runs SEEM's ``evaluate`` on the image resized so that its short side
is N (long side rounded down, as torchvision's ``Resize(N)`` in SEEM's
``inference/xdecoder/infer_semseg.py``), with the resize the adapter documents (bicubic,
antialiased, rounded to 0-255: the pixels ``annotate run`` gives the model; its closeness to
PIL's is tested elsewhere). OUT (.npz) gets, per image file stem, float32
(P + 1, H, W): SEEM's ``sem_seg`` (P prompts) and, last, the no-object column
Σ_q softmax(pred_logits)[..., -1] · sigmoid(masks) made from the same raw outputs with SEEM's
``sem_seg_postprocess``. Its panoptic and instance outputs are switched off (they do not change
``sem_seg``). Nothing of this project is imported: the reference is computed independently.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("seem_root", "config", "tokenizer", "checkpoint", "images", "out"):
        ap.add_argument(name)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(args.seem_root).resolve()))
    if not hasattr(Image, "LINEAR"):  # Pillow >= 10: the name the detectron2 fork needs
        Image.LINEAR = Image.Resampling.BILINEAR
    from modeling import build_model
    from modeling.BaseModel import BaseModel
    from modeling.modules import sem_seg_postprocess
    from utils.arguments import load_opt_from_config_files

    opt = load_opt_from_config_files([args.config])
    opt["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"] = args.tokenizer
    opt.update(CUDA=True, world_size=1, local_size=1, rank=0, local_rank=0)
    opt["device"] = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(args.seed)
    net = build_model(opt)
    torch.save(net.state_dict(), args.checkpoint)  # what BaseModel.save_pretrained saves
    model = BaseModel(opt, net).from_pretrained(args.checkpoint).eval()
    model = model.to(opt["device"])
    net = model.model
    net.panoptic_on = net.instance_on = False
    prompts = args.prompts.split(",") + ["background"]
    lang = net.sem_seg_head.predictor.lang_encoder
    with torch.no_grad():
        lang.get_text_embeddings(prompts, is_eval=True)

    raw: dict = {}
    net.sem_seg_head.register_forward_hook(lambda m, i, o: raw.update(o))
    out = {}
    for f in sorted(Path(args.images).glob("*.png")):
        img = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
        h, w = img.shape[-2:]
        n = args.short_side
        size = (n, int(n * w / h)) if h <= w else (int(n * h / w), n)
        x = torch.nn.functional.interpolate(
            img[None].float(), size=size, mode="bicubic", align_corners=False, antialias=True
        )
        x = x.round().clamp(0, 255)[0].to(opt["device"])
        with torch.no_grad():
            sem = net.evaluate([{"image": x, "height": h, "width": w}])[0]["sem_seg"]
            pad = tuple(-(-s // net.size_divisibility) * net.size_divisibility for s in size)
            masks = torch.nn.functional.interpolate(
                raw["pred_masks"], size=pad, mode="bilinear", align_corners=False
            )[0]
            p_none = torch.softmax(raw["pred_logits"][0], dim=-1)[:, -1]
            if net.sem_seg_postprocess_before_inference:
                post = sem_seg_postprocess(masks, size, h, w)
                none = torch.einsum("q,qhw->hw", p_none, post.sigmoid())
            else:
                none = torch.einsum("q,qhw->hw", p_none, masks.sigmoid())
                none = sem_seg_postprocess(none[None], size, h, w)[0]
        out[f.stem] = torch.cat([sem, none[None]]).float().cpu().numpy()
        print(f"{f.stem}: {tuple(x.shape)} -> {tuple(out[f.stem].shape)}", flush=True)
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
