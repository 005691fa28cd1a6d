"""The ``seem`` backend against a test double of SEEM's code (``tests/seem_double``: SEEM's
import paths, options, outputs and device behaviour), on a simulated CUDA device
(``_cuda_sim.FakeCuda``) here and on real CUDA in the ``gpu`` tests."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _annotate_fixtures import make_dataset, write_clip_tokenizer, write_config
from _cuda_sim import FakeCuda
from PIL import Image

import data_manifest
from annotate import open_cache
from annotate.cli import app
from annotate.config import AnnotateConfig
from annotate.run import run_annotation
from annotate.seem import (
    INSTALL_HINT,
    NO_OBJECT,
    load_seem_annotator,
    resized_shape,
    seem_device,
)
from data_manifest.errors import UserError

DOUBLE = Path(__file__).parent / "seem_double"
CONFIG = DOUBLE / "configs" / "seem_double.yaml"
WORDS = ("cat", "dog", "puppy", "background", "photo", "bad", "scene", "the", "in")
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()  # before any test replaces it


def _forget_double() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in ("modeling", "utils")]:
        f = getattr(sys.modules[name], "__file__", None) or ""
        if f.startswith(str(DOUBLE)):
            del sys.modules[name]
    while str(DOUBLE) in sys.path:
        sys.path.remove(str(DOUBLE))


@pytest.fixture
def double(monkeypatch):
    """SEEM's double importable from ``seem_root``; mpi4py (imported by SEEM's
    utils/distributed.py) stubbed; everything forgotten afterwards."""
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=None))
    _forget_double()
    yield DOUBLE
    _forget_double()


@pytest.fixture
def cuda(monkeypatch):
    return FakeCuda(count=2).install(monkeypatch)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tok") / "clip", WORDS)


def _config(tmp: Path, before_inference: bool) -> Path:
    """The double's config with SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE (and the panoptic and
    instance flags that also switch it on upstream) set."""
    text = CONFIG.read_text()
    for key in ("INSTANCE_ON", "PANOPTIC_ON", "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE"):
        text = text.replace(f"{key}: true", f"{key}: {str(before_inference).lower()}")
        text = text.replace(f"{key}: false", f"{key}: {str(before_inference).lower()}")
    path = tmp / f"seem_{before_inference}.yaml"
    path.write_text(text)
    return path


def _checkpoint(tmp: Path, tokenizer: Path, conf: Path = CONFIG) -> Path:
    """A state dict of the double, built as SEEM builds a model (on the current CUDA device,
    real or simulated)."""
    sys.path.insert(0, str(DOUBLE))
    from modeling import build_model
    from utils.arguments import load_opt_from_config_files

    opt = load_opt_from_config_files([str(conf)])
    opt["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"] = str(tokenizer)
    torch.manual_seed(0)
    net = build_model(opt)
    path = tmp / "seem_double.pt"
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, path)
    return path


def _cfg(ckpt: Path, tokenizer: Path, conf: Path = CONFIG, **kw) -> AnnotateConfig:
    kw = {"device": "cuda:1", "input_short_side": 0, "batch_size": 2, "amp": False, **kw}
    return AnnotateConfig(
        annotator="seem",
        seem_root=str(DOUBLE),
        seem_config=str(conf),
        model=str(ckpt),
        seem_tokenizer=str(tokenizer),
        topk=0,
        **kw,
    )


def _run_config(tmp: Path, manifest: Path, ckpt: Path, tokenizer: Path, **kw) -> Path:
    """A run config (run folder tmp/run) for SEEM's double."""
    return write_config(
        tmp / "run.toml",
        tmp / "run",
        manifest,
        annotator="seem",
        seem_root=str(DOUBLE),
        seem_config=str(CONFIG),
        model=str(ckpt),
        seem_tokenizer=str(tokenizer),
        **kw,
    )


def _texts(monkeypatch, cuda: FakeCuda | None = None) -> list[list[str]]:
    """Record the names each get_text_embeddings call embeds (and an ("embed",) event)."""
    sys.path.insert(0, str(DOUBLE))
    from modeling.language.vlpencoder import LanguageEncoder

    calls: list[list[str]] = []
    original = LanguageEncoder.get_text_embeddings

    def spy(self, class_names, *args, **kwargs):
        calls.append(list(class_names))
        if cuda is not None:
            cuda.events.append(("embed",))
        return original(self, class_names, *args, **kwargs)

    monkeypatch.setattr(LanguageEncoder, "get_text_embeddings", spy)
    return calls


# -- findings 1 and 2: device order, current device, CUDA only ------------------------------


def test_seem_is_built_and_embedded_on_the_chosen_cuda_device(
    tmp_path, double, cuda, tokenizer, monkeypatch
):
    ckpt = _checkpoint(tmp_path, tokenizer)
    cuda.events.clear()
    cuda.current = 0
    texts = _texts(monkeypatch, cuda)
    m = data_manifest.load(make_dataset(tmp_path / "ds", 1, 0, 0))
    ann = load_seem_annotator(_cfg(ckpt, tokenizer, device="cuda:1"), m)
    ev = cuda.events
    # everything SEEM places on CUDA goes to device 1, none to the default device 0
    assert cuda.placements() and {e[1] for e in cuda.placements()} == {1}, ev
    # made current before the model is built (its buffer asks for the current device)
    assert ev.index(("set_device", 1)) < cuda.first("current_device") < len(ev)
    # the checkpoint is read onto it, the model moved there, and only then are the prompts
    # embedded (their tokens go to the current device: tensor.cuda events after "embed")
    moved = ev.index(("module.to", 1, "BaseModel"))
    assert cuda.first("load") < moved < cuda.first("embed") < len(ev)
    assert ("tensor.cuda", 1) in ev[cuda.first("embed") :]
    assert ann.device == torch.device("cuda", 1)
    assert texts == [["cat", "dog", "background"]]
    lang = ann.model.model.sem_seg_head.predictor.lang_encoder
    assert lang.default_text_embeddings.shape == (3, 16)
    # moving again re-embeds after the move, on the new current device
    cuda.events.clear()
    ann.to(torch.device("cuda", 0))
    assert cuda.events[0] == ("set_device", 0)
    assert cuda.events.index(("module.to", 0, "BaseModel")) < cuda.first("embed")
    assert {e[1] for e in cuda.placements()} == {0} and len(texts) == 2
    ann.to(torch.device("cuda", 0))
    assert len(texts) == 2  # already there: nothing recomputed


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cpu", "device = 'cpu': SEEM runs on CUDA only (its text encoder sends tokens to CUDA)"),
        ("mps", "device = 'mps': SEEM runs on CUDA only"),
        ("auto", "device = 'auto': SEEM runs on CUDA only and this machine has no CUDA device"),
    ],
)
def test_seem_refuses_devices_other_than_cuda(tmp_path, device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as exc:
        seem_device(device)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_seem_device_index_out_of_range(cuda):
    assert seem_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"device = 'cuda:2': expected cuda:0 to cuda:1 \(2 CUDA"):
        seem_device("cuda:2")


def test_seem_on_cpu_is_one_clear_line_from_the_command_line(tmp_path, double, tokenizer):
    if CUDA:
        pytest.skip("this machine has CUDA")
    from typer.testing import CliRunner

    man = make_dataset(tmp_path / "ds", 1, 0, 0)
    ckpt = tmp_path / "empty.pt"
    torch.save({}, ckpt)
    conf = _run_config(tmp_path, man, ckpt, tokenizer, device="cpu")
    r = CliRunner().invoke(app, ["run", "--config", str(conf), "--no-progress"])
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "device = 'cpu': SEEM runs on CUDA only" in lines[0], r.output
    assert not (tmp_path / "run" / "cache.zarr").exists()


# -- finding 3 and 5: scores from the raw outputs, no-object background, short side ----------


def _reference(net, image: np.ndarray, resized: np.ndarray, column: str) -> np.ndarray:
    """SEEM's own sem_seg (the double's upstream ``evaluate``) for ``resized`` at the size of
    ``image``, and the no-object column Σ_q softmax(pred_logits)[..., -1] · sigmoid(masks)
    computed from the same raw outputs: float32 (P + 1, H, W) with the no-object map last."""
    raw = {}
    hook = net.sem_seg_head.register_forward_hook(lambda m, i, o: raw.update(o))
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
    h, w = image.shape[:2]
    with torch.no_grad():
        sem = net.evaluate([{"image": x, "height": h, "width": w}])[0]["sem_seg"]
    hook.remove()
    hp, wp = -(-x.shape[1] // 32) * 32, -(-x.shape[2] // 32) * 32
    masks = F.interpolate(raw["pred_masks"], size=(hp, wp), mode="bilinear")[0]
    p_none = torch.softmax(raw["pred_logits"][0], dim=-1)[:, -1]

    def post(a):  # crop the padding, bicubic to the image
        a = a[:, : x.shape[1], : x.shape[2]][None]
        return F.interpolate(a, size=(h, w), mode="bicubic", antialias=True)[0]

    if net.sem_seg_postprocess_before_inference:
        none = torch.einsum("q,qhw->hw", p_none, post(masks).sigmoid())
    else:
        none = post(torch.einsum("q,qhw->hw", p_none, masks.sigmoid())[None])[0]
    if column == "background":
        return torch.cat([sem, none[None]]).float().cpu().numpy()
    return sem.float().cpu().numpy()


@pytest.mark.parametrize("before_inference", [False, True])
def test_scores_are_seem_sem_seg_plus_its_no_object_column(
    tmp_path, double, cuda, tokenizer, before_inference
):
    conf = _config(tmp_path, before_inference)
    ckpt = _checkpoint(tmp_path, tokenizer, conf)
    sizes = [(45, 70), (45, 70), (61, 38)]  # non-square, two batches of different shapes
    m = data_manifest.load(make_dataset(tmp_path / "ds", 2, 1, 0, sizes=sizes))
    cfg = _cfg(ckpt, tokenizer, conf)
    ann = load_seem_annotator(cfg, m)
    assert ann.classes == (NO_OBJECT, "cat", "dog")
    assert ann.groups == {"background": [NO_OBJECT], "cat": ["cat"], "dog": ["dog"]}
    run_annotation(cfg, m, tmp_path / "c.zarr", annotator=ann)
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.meta.normalization == "sum"  # identity vocabulary: SEEM's scores as they are
    net = ann.model.model
    for row in m.rows:
        img = m.read_image(row)
        ref = _reference(net, img, img, "background")  # [cat, dog, no object]
        want = np.stack([ref[2], ref[0], ref[1]])
        got = cache.scores(row.id)
        assert got.shape == (3, *img.shape[:2])
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
        # over all P + 1 columns the per-pixel total is Σ_q sigmoid(mask_q) > 0
        p = cache.probs(row.id)
        np.testing.assert_allclose(p, want / want.sum(0, keepdims=True), atol=2e-3)


def test_background_is_not_prompted_and_synonyms_are_summed(tmp_path, double, cuda, tokenizer):
    ckpt = _checkpoint(tmp_path, tokenizer)
    m = data_manifest.load(make_dataset(tmp_path / "ds", 1, 0, 0, size=(40, 52)))
    cfg = _cfg(ckpt, tokenizer, prompts={"dog": ["dog", "puppy"]})
    ann = load_seem_annotator(cfg, m)
    assert ann.classes == (NO_OBJECT, "cat", "dog", "puppy")
    run_annotation(cfg, m, tmp_path / "c.zarr", annotator=ann)
    cache = open_cache(tmp_path / "c.zarr")
    assert cache.meta.normalization == "probs"
    assert cache.meta.extra["settings"]["vocabulary"]["map"]["background"] == [NO_OBJECT]
    img = m.read_image(m.rows[0])
    ref = _reference(ann.model.model, img, img, "background")  # cat, dog, puppy, no object
    p = ref / ref.sum(0, keepdims=True)
    want = np.stack([p[3], p[0], p[1] + p[2]])
    np.testing.assert_allclose(cache.probs(m.rows[0].id), want, atol=2e-3)
    # a prompt "background" would share the no-object slot's text embedding: refused
    for prompts in ({"cat": ["cat", "Background"]}, {"background": ["background"]}):
        with pytest.raises(UserError, match="SEEM already uses 'background' as its no-object"):
            load_seem_annotator(_cfg(ckpt, tokenizer, prompts=prompts), m)


def test_datasets_without_background_drop_the_no_object_column(tmp_path, double, cuda, tokenizer):
    ckpt = _checkpoint(tmp_path, tokenizer)
    man = make_dataset(tmp_path / "ds", 1, 0, 0, size=(40, 52), classes=["cat", "dog"])
    m = data_manifest.load(man)
    m.meta.background_index = None
    ann = load_seem_annotator(_cfg(ckpt, tokenizer), m)
    assert ann.classes == ("cat", "dog")
    img = m.read_image(m.rows[0])
    with torch.no_grad():
        got = ann.predict(torch.from_numpy(img).permute(2, 0, 1)[None])[0].numpy()
    ref = _reference(ann.model.model, img, img, "none")  # SEEM's sem_seg: [cat, dog]
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


def test_short_side_resize_as_seem_inference(tmp_path, double, cuda, tokenizer):
    """VOC-sized image, short side 512 with the aspect ratio kept (SEEM's
    inference/xdecoder/infer_semseg.py: torchvision Resize(512, BICUBIC) on a PIL image), scores
    at the image size."""
    assert resized_shape(375, 500, 512) == (512, 682)
    assert resized_shape(500, 375, 512) == (682, 512)
    assert resized_shape(512, 512, 512) == (512, 512)
    assert resized_shape(375, 500, 0) == (375, 500)
    ckpt = _checkpoint(tmp_path, tokenizer)
    m = data_manifest.load(make_dataset(tmp_path / "ds", 1, 0, 0, size=(375, 500)))
    ann = load_seem_annotator(_cfg(ckpt, tokenizer, input_short_side=512), m)
    assert ann.extra["preprocessing"] == {"short_side": 512, "resample": "bicubic"}
    from skimage import data as photos

    img = np.ascontiguousarray(photos.astronaut()[:375, :500])
    resized = np.asarray(Image.fromarray(img).resize((682, 512), Image.BICUBIC))
    with torch.no_grad():
        got = ann.predict(torch.from_numpy(img).permute(2, 0, 1)[None])[0].numpy()
    assert got.shape == (3, 375, 500)
    ref = _reference(ann.model.model, img, resized, "background")
    want = np.stack([ref[2], ref[0], ref[1]])
    # PIL's and torch's bicubic differ by about one grey level on a few pixels (measured:
    # mean error 0.001 for scores of mean 1.27, max 0.012)
    err = np.abs(got - want)
    assert err.mean() < 2e-3 * np.abs(want).mean() and err.max() < 0.02 * want.max()
    # the no-resize path on the same image is farther from SEEM's (it sees another input)
    with torch.no_grad():
        ann.short_side = 0
        plain = ann.predict(torch.from_numpy(img).permute(2, 0, 1)[None])[0].numpy()
    assert np.abs(plain - want).mean() > 5 * err.mean()


def test_resize_matches_pil_bicubic_on_a_photo():
    from skimage import data as photos

    from annotate.common import resize_images

    img = np.ascontiguousarray(photos.astronaut()[:375, :500])
    want = np.asarray(Image.fromarray(img).resize((682, 512), Image.BICUBIC)).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    got = resize_images(x, (512, 682), "bicubic")[0].permute(1, 2, 0).numpy()
    d = np.abs(got - want)
    # measured: mean 0.16 grey levels, 0.01 % of the values more than one level apart
    assert d.mean() < 0.3 and (d > 1).mean() < 2e-3


# -- install: tokenizer folder, missing checkout or dependency --------------------------------


def test_missing_checkout_and_dependencies_are_one_line(tmp_path, double, cuda, monkeypatch):
    m = data_manifest.load(make_dataset(tmp_path / "ds", 1, 0, 0))
    ckpt = tmp_path / "x.pt"
    torch.save({}, ckpt)
    base = dict(annotator="seem", seem_config=str(CONFIG), model=str(ckpt), device="cuda")

    def error(**kw) -> str:
        with pytest.raises(UserError) as exc:
            load_seem_annotator(AnnotateConfig(**{**base, **kw}), m)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert error(seem_root=str(tmp_path / "nope")) == (
        f"[annotate] seem_root = {str(tmp_path / 'nope')!r}: folder not found; expected a "
        "checkout of SEEM's repository"
    )
    assert "not a SEEM checkout; expected its modeling/ folder and utils/arguments.py" in error(
        seem_root=str(tmp_path)
    )
    for mod in ("modeling", "utils"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert error() == INSTALL_HINT
    monkeypatch.delitem(sys.modules, "modeling")
    monkeypatch.delitem(sys.modules, "utils")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # SEEM's utils/distributed.py needs it
    assert error(seem_root=str(DOUBLE)) == (
        "SEEM's code needs the module 'mpi4py', which is not installed; redo step 2 of the SEEM "
        "recipe in docs/annotate.md (python -m annotate seem-requirements, pip install)"
    )
    assert "seem_config = '': file not found" in error(seem_config="")
    assert "model = 'missing.pt': file not found" in error(model="missing.pt")


def test_tokenizer_folder_is_checked(tmp_path, double, cuda, tokenizer, monkeypatch):
    m = data_manifest.load(make_dataset(tmp_path / "ds", 1, 0, 0))
    ckpt = _checkpoint(tmp_path, tokenizer)

    def error(tok: str) -> str:
        with pytest.raises(UserError) as exc:
            load_seem_annotator(_cfg(ckpt, Path(tok)), m)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert error(str(tmp_path / "absent")) == (
        f"[annotate] seem_tokenizer = {str(tmp_path / 'absent')!r}: folder not found; expected "
        "a local copy of the openai/clip-vit-base-patch32 tokenizer (docs/annotate.md)"
    )
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_text("{}")
    assert "no tokenizer files; expected the CLIP tokenizer's tokenizer.json, or vocab.json" in (
        error(str(half))
    )
    (half / "merges.txt").write_text("")
    (half / "vocab.json").write_text("{not json")
    assert "vocab.json: not valid JSON" in error(str(half))
    # a folder saved by transformers 5 (tokenizer.json only) is what SEEM then reads
    from transformers import CLIPTokenizer

    saved = tmp_path / "saved"
    CLIPTokenizer.from_pretrained(str(tokenizer)).save_pretrained(saved)
    assert not (saved / "vocab.json").exists()
    ann = load_seem_annotator(_cfg(ckpt, saved), m)
    assert ann.model.model.sem_seg_head.predictor.lang_encoder.tokenizer.tokenize("cat") == [
        "cat</w>"
    ]
    # no folder set and no network: transformers 5 gives SEEM an empty tokenizer (no error)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as exc:
        load_seem_annotator(_untokenized(ckpt), m)
    assert str(exc.value) == (
        f"{CONFIG}: SEEM's text tokenizer turns the prompt 'cat' into special tokens only "
        "(its vocabulary could not be loaded); set [annotate] seem_tokenizer to a local copy "
        "of it (docs/annotate.md)"
    )


def _untokenized(ckpt: Path) -> AnnotateConfig:
    return AnnotateConfig(
        annotator="seem",
        seem_root=str(DOUBLE),
        seem_config=str(CONFIG),
        model=str(ckpt),
        device="cuda:1",
    )


# -- on a GPU ---------------------------------------------------------------------------------


def _gpu_devices() -> list[int]:
    return list(range(min(2, torch.cuda.device_count()))) if CUDA else []


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("amp", [False, True])
def test_seem_double_on_real_cuda(tmp_path, double, tokenizer, index, amp):
    if index not in _gpu_devices():
        pytest.skip(f"needs CUDA device {index}")
    torch.cuda.set_device(0)
    ckpt = _checkpoint(tmp_path, tokenizer)
    sizes = [(45, 70), (61, 38)]
    m = data_manifest.load(make_dataset(tmp_path / "ds", 2, 0, 0, sizes=sizes))
    cfg = _cfg(ckpt, tokenizer, device=f"cuda:{index}", input_short_side=64, amp=amp)
    ann = load_seem_annotator(cfg, m)
    device = torch.device("cuda", index)
    lang = ann.model.model.sem_seg_head.predictor.lang_encoder
    assert lang.default_text_embeddings.device == device
    assert all(p.device == device for p in ann.model.parameters())
    run_annotation(cfg, m, tmp_path / "c.zarr", annotator=ann)
    cache = open_cache(tmp_path / "c.zarr")
    for row in m.rows:
        img = m.read_image(row)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            got = ann.predict(x)
        assert got.device == device and got.dtype == torch.float32
        size = resized_shape(*img.shape[:2], 64)
        resized = np.asarray(Image.fromarray(img).resize(size[::-1], Image.BICUBIC))
        ref = _reference(ann.model.model, img, resized, "background")
        want = np.stack([ref[2], ref[0], ref[1]])
        err = np.abs(cache.scores(row.id) - want)
        assert err.mean() < 0.02 * np.abs(want).mean() + 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_annotate_run_command_with_seem_double_on_cuda(tmp_path, double, tokenizer):
    """``python -m annotate run`` in a fresh process, SEEM's double on CUDA with AMP."""
    ckpt = _checkpoint(tmp_path, tokenizer)
    man = make_dataset(tmp_path / "ds", 2, 3, 1, size=(60, 90))
    conf = _run_config(tmp_path, man, ckpt, tokenizer, device="cuda", amp=True, input_short_side=96)
    stubs = tmp_path / "stubs" / "mpi4py"
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text("MPI = None\n")
    env = {**os.environ, "PYTHONPATH": str(stubs.parent), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "annotate", "run", "--config", str(conf), "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cache = open_cache(tmp_path / "run" / "cache.zarr")
    assert len(cache) == 6 and cache.meta.annotator == "seem"
    p = cache.probs("l00")
    assert p.shape == (3, 60, 90) and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(0), 1.0, atol=2e-3)


@pytest.mark.seem
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_real_seem_model(tmp_path):
    """The real SEEM: set SEEM_ROOT, SEEM_CONFIG, SEEM_CHECKPOINT and SEEM_TOKENIZER."""
    env = {k: os.environ.get(k, "") for k in ("SEEM_ROOT", "SEEM_CONFIG", "SEEM_CHECKPOINT")}
    if not (env["SEEM_ROOT"] and Path(env["SEEM_CONFIG"]).is_file()):
        pytest.skip("set SEEM_ROOT, SEEM_CONFIG, SEEM_CHECKPOINT (and SEEM_TOKENIZER)")
    man = make_dataset(tmp_path / "ds", 1, 1, 0, size=(375, 500))
    cfg = AnnotateConfig(
        annotator="seem",
        seem_root=env["SEEM_ROOT"],
        seem_config=env["SEEM_CONFIG"],
        model=env["SEEM_CHECKPOINT"],
        seem_tokenizer=os.environ.get("SEEM_TOKENIZER", ""),
        batch_size=1,
        topk=0,
    )
    run_annotation(cfg, data_manifest.load(man), tmp_path / "c.zarr")
    cache = open_cache(tmp_path / "c.zarr")
    p = cache.probs("l00")
    assert p.shape == (3, 375, 500)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-3)


# -- prompts as SEEM embeds them, checkpoints of another config -------------------------------


def test_cache_records_the_prompt_texts_seem_embeds(tmp_path, double, cuda, tokenizer, monkeypatch):
    """SEEM's text encoder removes -other, -merged and -stuff from a name before its templates
    (upstream modeling/language/vlpencoder.py): the cache records the texts it embedded."""
    ckpt = _checkpoint(tmp_path, tokenizer)
    m = data_manifest.load(make_dataset(tmp_path / "ds", 1, 0, 0))
    said: list[str] = []
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    call = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        if kwargs.get("padding") == "max_length":  # SEEM's text encoder, not our own check
            said.extend([text] if isinstance(text, str) else text)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    # prompts as a user may copy them from SEEM's COCO class names
    cfg = _cfg(ckpt, tokenizer, prompts={"cat": ["cat-merged"], "dog": ["dog-other"]})
    ann = load_seem_annotator(cfg, m)
    assert ann.classes == (NO_OBJECT, "cat-merged", "dog-other")
    assert ann.extra["prompts"] == ["cat", "dog"] and ann.extra["no_object_prompt"] == "background"
    templates = ann.extra["prompt_templates"]
    assert templates == ["a photo of a {}.", "a bad photo of the {}.", "a {} in a scene."]
    assert said == [t.format(p) for p in ("cat", "dog", "background") for t in templates]
    run_annotation(cfg, m, tmp_path / "c.zarr", annotator=ann)
    model = open_cache(tmp_path / "c.zarr").meta.extra["model"]
    assert model["prompts"] == ["cat", "dog"] and model["prompt_templates"] == templates
    # prompts SEEM would embed alike are refused: they would share one score
    for prompts, first, second, text in (
        ({"cat": ["cat", "Cat-stuff"]}, "cat = 'cat'", "cat = 'Cat-stuff'", "cat"),
        ({"dog": ["cat-other"]}, "cat = 'cat'", "dog = 'cat-other'", "cat"),
        ({"cat": ["background-stuff"]}, None, None, "background"),
    ):
        with pytest.raises(UserError) as exc:
            load_seem_annotator(_cfg(ckpt, tokenizer, prompts=prompts), m)
        if first:
            assert str(exc.value) == (
                f"[annotate] prompts: {first} and {second} are both embedded as {text!r} by SEEM "
                "(it lower-cases and removes -other, -merged, -stuff); expected prompts that "
                "differ"
            )
        else:
            assert "SEEM already uses 'background' as its no-object text" in str(exc.value)


def test_checkpoint_of_another_config_is_one_line(tmp_path, double, cuda, tokenizer):
    """SEEM's from_pretrained skips tensors whose name or shape differ (utils/model.py): such
    a checkpoint is refused before it leaves the model half random."""
    m = data_manifest.load(make_dataset(tmp_path / "ds", 1, 0, 0))
    wide = tmp_path / "wide.yaml"
    wide.write_text(CONFIG.read_text().replace("HIDDEN_DIM: 16", "HIDDEN_DIM: 24"))
    (tmp_path / "w").mkdir()
    other = _checkpoint(tmp_path / "w", tokenizer, wide)
    with pytest.raises(UserError) as exc:
        load_seem_annotator(_cfg(other, tokenizer), m)
    assert str(exc.value) == (
        f"{other}: not a checkpoint of seem_double.yaml: 5 tensors of another shape (e.g. "
        "sem_seg_head.predictor.class_embed: (24, 16) in the checkpoint, (16, 16) in the model); "
        "expected a checkpoint made with this config and tokenizer"
    )
    ckpt = _checkpoint(tmp_path, tokenizer)
    state = torch.load(ckpt)
    del state["backbone.stem.weight"]
    state["unused.extra"] = torch.zeros(2)
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(UserError) as exc:
        load_seem_annotator(_cfg(partial, tokenizer), m)
    assert str(exc.value).endswith(
        "not a checkpoint of seem_double.yaml: 1 of the model's 13 parameters missing (e.g. "
        "backbone.stem.weight); expected a checkpoint made with this config and tokenizer"
    )
    del state["unused.extra"]
    state["backbone.stem.weight"] = torch.zeros(1)
    torch.save(state, partial)
    with pytest.raises(UserError, match=r"1 tensors of another shape \(e.g. backbone.stem.weight"):
        load_seem_annotator(_cfg(partial, tokenizer), m)
    # tensors the model does not have are ignored, as SEEM ignores them, and counted
    state = torch.load(ckpt)
    state["criterion.unused"] = torch.zeros(3)
    torch.save(state, partial)
    assert load_seem_annotator(_cfg(partial, tokenizer), m).extra["checkpoint_tensors_ignored"] == 1


# -- any failure while SEEM is imported: one line naming the recipe step ---------------------


@pytest.fixture
def fake_seem(tmp_path, monkeypatch):
    """write(module_code, **packages): a SEEM checkout whose modeling/__init__.py runs
    ``module_code``, and packages (name -> __init__ code) first on the path; both forgotten
    afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    names = ("modeling", "utils", "detectron2", "torchvision", "somepkg")
    before = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in names}
    root = tmp_path / "seem"

    def write(code: str, **packages: str) -> Path:
        (root / "modeling").mkdir(parents=True)
        (root / "utils").mkdir()
        (root / "modeling" / "__init__.py").write_text(code + "\ndef build_model(opt): pass\n")
        (root / "modeling" / "BaseModel.py").write_text("class BaseModel: pass\n")
        (root / "utils" / "__init__.py").write_text("")
        (root / "utils" / "arguments.py").write_text("def load_opt_from_config_files(f): pass\n")
        (root / "utils" / "prompt_engineering.py").write_text("def get_prompt_templates(): pass\n")
        for name, init in packages.items():
            (site / name).mkdir()
            (site / name / "__init__.py").write_text(init)
        return root

    yield write
    for n in [n for n in sys.modules if n.split(".")[0] in names]:
        del sys.modules[n]
    sys.modules.update(before)
    while str(root) in sys.path:
        sys.path.remove(str(root))


STEP_0 = (
    "redo step 0 of the SEEM recipe in docs/annotate.md (torch and the torchvision built for "
    "it, from one index)"
)
STEP_3 = (
    "redo step 3 of the SEEM recipe in docs/annotate.md (its detectron2 fork, "
    "MaureenZOU/detectron2-xyz)"
)


def _import_error(root: Path) -> str:
    from annotate.seem import check_install

    with pytest.raises(UserError) as exc:
        check_install(str(root))
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_seem_without_its_fork(fake_seem):
    root = fake_seem("import detectron2")
    assert _import_error(root) == (
        "SEEM's code imports detectron2, which is not installed: SEEM needs its fork; " + STEP_3
    )


def test_fork_that_raises_at_import(fake_seem, tmp_path):
    # the error comes out of Pillow (this project's), called from the fork: the fork is named
    root = fake_seem(
        "import detectron2", detectron2="from PIL import Image\nINTERP = Image.NO_SUCH_NAME\n"
    )
    init = tmp_path / "site" / "detectron2" / "__init__.py"
    assert _import_error(root) == (
        "SEEM's detectron2 fork raised AttributeError: module 'PIL.Image' has no attribute "
        f"'NO_SUCH_NAME' ({init}:2); " + STEP_3
    )


def test_fork_using_image_linear_imports_on_this_pillow(fake_seem):
    """Pillow >= 10 has no Image.LINEAR, which the fork's transform.py uses at import: the
    adapter restores it as the alias of BILINEAR it was."""
    from PIL import Image

    had = hasattr(Image, "LINEAR")
    root = fake_seem(
        "import detectron2", detectron2="from PIL import Image\nINTERP = Image.LINEAR\n"
    )
    from annotate.seem import _import_seem

    _import_seem(str(root))
    assert sys.modules["detectron2"].INTERP == Image.BILINEAR == 2
    if not had:
        del Image.LINEAR


def test_torchvision_of_another_build(fake_seem, tmp_path):
    root = fake_seem(
        "import torchvision",
        torchvision="raise RuntimeError('operator torchvision::nms does not exist')\n",
    )
    msg = _import_error(root)
    init = tmp_path / "site" / "torchvision" / "__init__.py"
    assert msg.startswith("torchvision ") and msg.endswith(
        f" (RuntimeError: operator torchvision::nms does not exist) ({init}:1); " + STEP_0
    ), msg


def test_other_failures_name_their_package_or_seem(fake_seem, tmp_path):
    root = fake_seem("import somepkg", somepkg="raise ValueError('bad build')\n")
    init = tmp_path / "site" / "somepkg" / "__init__.py"
    assert _import_error(root) == (
        f"the package 'somepkg' raised ValueError: bad build while SEEM was imported ({init}:1); "
        "redo step 2 of the SEEM recipe in docs/annotate.md (python -m annotate "
        "seem-requirements, pip install)"
    )
    # a missing module is named; the step follows from what it is
    for name in sys.modules.copy():
        if name.split(".")[0] in ("modeling", "utils", "somepkg"):
            del sys.modules[name]
    (root / "modeling" / "__init__.py").write_text("import torchvision.ops\n")
    assert _import_error(root) == (
        "SEEM's code needs the module 'torchvision', which is not installed; " + STEP_0
    )
    for name in sys.modules.copy():
        if name.split(".")[0] in ("modeling", "utils"):
            del sys.modules[name]
    (root / "modeling" / "__init__.py").write_text("x = undefined_name\n")
    assert _import_error(root) == (
        "SEEM's code raised NameError: name 'undefined_name' is not defined "
        f"({root / 'modeling' / '__init__.py'}:1); expected v1.0: redo step 1 of the SEEM recipe "
        "in docs/annotate.md (SEEM's checkout, v1.0)"
    )
