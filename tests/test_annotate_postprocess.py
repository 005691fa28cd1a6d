"""What a cache stores for an image: top-k selection (numpy and torch), the host computation of
a CPU run (schema 1's on contiguous scores, bit for bit), and the device computation of a GPU
run (``pytest -m gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from annotate.cache import (
    CacheMeta,
    Storage,
    encode_image,
    finish_image,
    resize_chw,
    storage_for,
    topk_encode,
)
from annotate.postprocess import device_arrays, topk

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tied(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities over axis 0 with many exact ties (values rounded to tenths)."""
    p = rng.random(shape).astype(np.float32).round(1)
    p[0] += 1e-3  # no pixel without mass
    return (p / p.sum(axis=0)).astype(np.float32)


def _stable_topk(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: a stable descending sort over axis 0 (ties: lowest class first)."""
    order = np.argsort(-p, axis=0, kind="stable")[:k]
    return order.astype(np.uint8), np.take_along_axis(p, order, 0).astype(np.float16)


@pytest.mark.parametrize("k", [1, 2, 4, 9, 13])
def test_topk_is_a_stable_descending_sort(k):
    rng = np.random.default_rng(k)
    p = _tied(rng, (13, 17, 23))
    want = _stable_topk(p, k)
    for got in (
        topk_encode(p, k),
        topk_encode(p, k, block=50),  # blocks that split rows
        topk_encode(np.ascontiguousarray(p.transpose(1, 2, 0)).transpose(2, 0, 1), k),
        [a[0].numpy() for a in topk(torch.from_numpy(p)[None], k)],
    ):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[0].dtype == np.uint8 and got[1].dtype == np.float16


def test_topk_zeros_negative_zero_and_nan():
    p = np.zeros((5, 1, 4), np.float32)
    p[3, 0, 0] = 1.0  # one class; the other four tie at 0
    p[:, 0, 1] = [0.0, -0.0, 0.5, 0.5, 0.0]  # -0.0 ties with 0.0, as in a sort
    p[:, 0, 2] = 0.2
    p[:, 0, 3] = np.nan
    for index, prob in (
        topk_encode(p, 3),
        [a[0].numpy() for a in topk(torch.from_numpy(p)[None], 3)],
    ):
        np.testing.assert_array_equal(index[:, 0, :3], [[3, 2, 0], [0, 3, 1], [1, 0, 2]])
        np.testing.assert_array_equal(prob[:, 0, 1], [0.5, 0.5, 0.0])
        assert (index[:, 0, 3] < 5).all() and np.isnan(prob[:, 0, 3]).all()
    with pytest.raises(ValueError, match="more than 255"):
        topk_encode(np.zeros((300, 2, 2), np.float32), 2)


def _schema_1_probs(s: np.ndarray, normalization: str) -> np.ndarray:
    """Schema 1's probabilities over axis 0, as its writer computed them."""
    if normalization == "softmax":
        e = np.exp(s - s.max(axis=0, keepdims=True))
        return e / e.sum(axis=0, keepdims=True)
    s = np.maximum(s, 0.0)
    total = s.sum(axis=0, keepdims=True)
    return np.where(total > 0, s / np.where(total > 0, total, 1.0), np.float32(1.0 / len(s)))


def _schema_1(scores: np.ndarray, st: Storage, height: int, width: int) -> dict[str, np.ndarray]:
    """What schema 1 stored: numpy probabilities, resized, then a stable sort or float16."""
    if st.mode == "scores":
        return {"scores": scores.astype(np.float16)}
    p = _schema_1_probs(scores, st.normalization)
    if st.resize:
        p = resize_chw(p, height, width)
    if st.mode == "probs":
        return {"scores": p.astype(np.float16)}
    index, prob = _stable_topk(p, st.k)
    return {"topk_index": index, "topk_prob": prob}


@pytest.mark.parametrize(
    "resolution,topk_on,norm",
    [("native", True, "softmax"), ("native", True, "sum"), ("native", False, "softmax"),
     ("image", True, "softmax"), ("image", False, "sum")],
)  # fmt: skip
def test_host_computation_is_schema_1s_on_contiguous_scores(resolution, topk_on, norm):
    meta = CacheMeta(tuple("abcdefg"), "x", "0", "0", norm, resolution=resolution, topk=3)
    st = storage_for(meta, topk_on)
    rng = np.random.default_rng(5)
    s = (rng.normal(size=(7, 30, 41)) * 4).astype(np.float32)
    if norm == "sum":
        s[:, :3, :3] = 0.0  # no score at all: uniform
    want = _schema_1(s, st, 45, 61)
    for scores in (s, np.ascontiguousarray(s.transpose(1, 2, 0)).transpose(2, 0, 1)):
        got = encode_image(scores, st, 45, 61)  # whatever the memory layout
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
            assert got[name].dtype == want[name].dtype


def test_storage_modes():
    meta = CacheMeta(tuple("abcd"), "x", "0", "0", "softmax", topk=2)
    assert storage_for(meta, True) == Storage("topk", 4, 2, "softmax", False)
    assert storage_for(meta, False).mode == "scores"
    image = CacheMeta(tuple("abcd"), "x", "0", "0", "sum", resolution="image", topk=0)
    assert storage_for(image, True) == Storage("probs", 4, 0, "sum", True)
    assert finish_image({"scores": np.zeros(1)}, storage_for(meta, False), 1, 1)["scores"].size == 1


def _close_to_host(device: dict[str, torch.Tensor], s: np.ndarray, st: Storage) -> None:
    """A device result against the host computation: torch's and numpy's exp differ in the
    last float32 bit, so a stored value may be one float16 step off and near-ties may swap."""
    for b in range(s.shape[0]):
        host = encode_image(s[b], st, *s.shape[2:])
        mine = finish_image({n: a[b].cpu().numpy() for n, a in device.items()}, st, *s.shape[2:])
        for name, want in host.items():
            got = mine[name]
            if name == "topk_index":
                assert (got == want).mean() > 0.9999
            else:
                np.testing.assert_allclose(
                    got.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-7
                )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("norm", ["softmax", "sum"])
def test_device_computation_is_close_to_the_host_one(device, norm):
    """VOC size on CUDA (smaller on a CPU), K = 21, in the channels-last memory that
    convolutions leave scores in."""
    rng = np.random.default_rng(7)
    shape = (2, 21, 375, 500) if device == "cuda" else (2, 21, 37, 50)
    s = (rng.normal(size=shape) * 3).astype(np.float32)
    if norm == "sum":
        s = np.abs(s)
    x = torch.from_numpy(s).to(device).contiguous(memory_format=torch.channels_last)
    for st in (Storage("topk", 21, 4, norm, False), Storage("scores", 21, 0, norm, False)):
        out = device_arrays(x, st)
        assert all(a.device.type == device for a in out.values())
        _close_to_host(out, s, st)
    half = device_arrays(x, Storage("scores", 21, 0, norm, False))["scores"].cpu().numpy()
    np.testing.assert_array_equal(half, s.astype(np.float16))  # the cast is exact rounding
    assert device_arrays(x, Storage("topk", 21, 2, norm, True))["probs"].dtype == torch.float32


# -- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
@CUDA
def test_cuda_topk_is_a_stable_sort_with_ties():
    rng = np.random.default_rng(8)
    p = _tied(rng, (21, 101, 99))
    for k in (1, 4, 9):
        index, prob = topk(torch.from_numpy(p).cuda()[None], k)
        want = _stable_topk(p, k)
        np.testing.assert_array_equal(index[0].cpu().numpy(), want[0])
        np.testing.assert_array_equal(prob[0].cpu().numpy(), want[1])
