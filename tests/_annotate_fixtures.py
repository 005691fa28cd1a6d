"""Tiny manifests, images and TorchScript annotators for the annotate tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_manifest import Manifest, Meta, Row
from data_manifest.io import encode_label_png

CLASSES = ["background", "cat", "dog"]
PALETTE = [[0, 0, 0], [200, 0, 0], [0, 200, 0]]


def make_dataset(
    root: Path,
    n_labeled: int = 3,
    n_unlabeled: int = 5,
    n_val: int = 2,
    size: tuple[int, int] = (20, 28),
    classes: list[str] | None = None,
    odd_ids: bool = False,
    sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """Write random PNG images (+ labels for labeled/val) and a manifest; return its path.

    Image ``j`` (over all splits) has size ``sizes[j]`` if given, else ``size``. ``odd_ids``
    gives ids with a space, '#' and '%' (legal file names that a Zarr key must quote).
    """
    classes = classes or CLASSES
    palette = (PALETTE + [[10 * i, 5 * i, 3 * i] for i in range(3, 256)])[: len(classes)]
    rows = []
    j = 0
    for split, n in (("labeled", n_labeled), ("unlabeled", n_unlabeled), ("val", n_val)):
        for i in range(n):
            h, w = sizes[j] if sizes else size
            rng = np.random.default_rng(100 + j)
            name = f"{split[0]}{i:02d}"
            image_id = f"city #{name}%" if odd_ids else name  # cache keys must quote these
            img_rel = f"images/{image_id}.png"
            (root / img_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / img_rel)
            lab_rel = None
            if split != "unlabeled":
                lab_rel = f"labels/{image_id}.png"
                (root / lab_rel).parent.mkdir(parents=True, exist_ok=True)
                lab = rng.integers(0, len(classes), (h, w)).astype(np.uint8)
                (root / lab_rel).write_bytes(encode_label_png(lab, palette))
            rows.append(Row(image_id, img_rel, lab_rel, split, h, w))
            j += 1
    meta = Meta(dataset="tiny", classes=list(classes), palette=palette, background_index=0)
    return Manifest(meta=meta, rows=rows).save(root / "manifest.jsonl")


class TinyNet(torch.nn.Module):
    """A 3x3 conv + ReLU + 1x1 conv; ``stride`` 2 gives a half-resolution "native" output."""

    def __init__(self, num_classes: int, stride: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Conv2d(3, 8, 3, stride=stride, padding=1)
        self.b = torch.nn.Conv2d(8, num_classes, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def save_torchscript(
    path: Path, num_classes: int = 3, stride: int = 1, seed: int = 0, meta: dict | None = None
) -> Path:
    """Script :class:`TinyNet` and save it, with ``meta`` as the embedded annotator.json."""
    net = torch.jit.script(TinyNet(num_classes, stride, seed).eval())
    extra = {"annotator.json": json.dumps(meta)} if meta is not None else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(net, str(path), _extra_files=extra)
    return path


def reference_logits(model_path: Path, image: np.ndarray, mean, std) -> np.ndarray:
    """The model's logits for one uint8 (H, W, 3) image, computed directly: float32 (K, h, w)."""
    net = torch.jit.load(str(model_path))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        return net((x - m) / s)[0].numpy()


def write_config(path: Path, run_dir: Path, manifest: Path, **annotate) -> Path:
    """A run config with ``[data] manifest`` and the given ``[annotate]`` keys."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = [
        f"run_dir = {json.dumps(str(run_dir))}",
        "seed = 0",
        "[data]",
        f"manifest = {json.dumps(str(manifest))}",
        "[annotate]",
    ]
    lines += [f"{k} = {val(v)}" for k, v in annotate.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _byte_chars() -> list[str]:
    """The 256 characters CLIP's byte-level BPE uses for the bytes 0-255 (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> Path:
    """A tiny CLIP BPE tokenizer (vocab.json + merges.txt, as CLIPTokenizer reads them): every
    byte, every byte at a word end, and merges that make each of ``words`` one token."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
                vocab.setdefault(a + b, len(vocab))
            pieces = [a + b, *pieces[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder
