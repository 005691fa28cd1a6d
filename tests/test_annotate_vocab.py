"""Vocabulary mapping and prompt lists."""

from __future__ import annotations

import numpy as np
import pytest

from annotate.cache import to_probs
from annotate.vocab import build_vocabulary, prompt_groups
from data_manifest.errors import UserError

SRC = ["person", "rider", "car", "truck", "sky", "tree"]
DST = ["background", "person", "vehicle"]


def _logits(seed=0, k=len(SRC)):
    return np.random.default_rng(seed).normal(size=(2, k, 4, 5)).astype(np.float32) * 2


def test_identity_passes_scores_through():
    v = build_vocabulary(["a", "b"], ["a", "b"])
    s = _logits(k=2)
    assert v.identity
    assert v.apply(s, "softmax") is s
    assert v.output_normalization("softmax") == "softmax"


def test_name_matching_ignores_case_and_separators():
    v = build_vocabulary(["Traffic_Light", "road"], ["road", "traffic light"])
    assert v.groups == ((1,), (0,))
    assert not v.identity


def test_many_to_one_sums_probabilities_and_unmapped_to_background():
    v = build_vocabulary(
        SRC,
        DST,
        {"vehicle": ["car", "truck"], "person": ["person", "rider"], "background": ["sky"]},
        unmapped="background",
        background_index=0,
    )
    s = _logits()
    out = v.apply(s, "softmax")
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out[:, 0], p[:, 4] + p[:, 5], rtol=1e-5)  # sky + unmapped tree
    np.testing.assert_allclose(out[:, 1], p[:, 0] + p[:, 1], rtol=1e-5)
    np.testing.assert_allclose(out[:, 2], p[:, 2] + p[:, 3], rtol=1e-5)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert v.output_normalization("softmax") == "probs"
    assert v.describe()["unmapped_classes"] == ["tree"]


def test_unmapped_drop_renormalises_downstream():
    v = build_vocabulary(
        SRC,
        DST,
        {"vehicle": ["car", "truck"], "person": ["person", "rider"], "background": ["sky"]},
        unmapped="drop",
    )
    s = np.abs(_logits(1))  # SEEM-like non-negative scores, "sum" normalization
    out = v.apply(s, "sum")
    assert v.output_normalization("sum") == "sum"
    p = s / s.sum(axis=1, keepdims=True)
    kept = np.stack([p[:, 4], p[:, 0] + p[:, 1], p[:, 2] + p[:, 3]], axis=1)
    np.testing.assert_allclose(out, kept, rtol=1e-5)
    final = to_probs(out[0], "sum")
    np.testing.assert_allclose(final, kept[0] / kept[0].sum(axis=0), rtol=1e-5)


def test_empty_list_gives_zero_probability():
    v = build_vocabulary(["a", "b"], ["a", "b", "c"], {"c": []}, unmapped="error")
    out = v.apply(_logits(k=2), "softmax")
    assert np.all(out[:, 2] == 0)


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        (
            {"mapping": {"vehicle": ["car"], "background": ["sky"]}, "unmapped": "error"},
            "not mapped to any dataset class",
        ),
        (
            {"mapping": {"vehicle": ["bus"], "background": ["sky"]}},
            "'bus' is not an annotator class",
        ),
        ({"mapping": {"boat": ["car"]}}, "'boat' is not a dataset class"),
        ({"mapping": {"vehicle": ["car"], "background": ["car", "sky"]}}, "mapped to both"),
        ({"mapping": {"person": ["person"]}}, "dataset class 'background' has no annotator class"),
        (
            {"mapping": {"vehicle": ["car"], "background": ["sky"]}, "unmapped": "background"},
            "no background class",
        ),
        ({"unmapped": "keep"}, "expected one of error, drop, background"),
    ],
)
def test_errors_name_the_problem(kwargs, expect):
    with pytest.raises(UserError, match=expect):
        build_vocabulary(SRC, DST, **kwargs)


def test_prompt_groups_default_and_synonyms():
    flat, groups = prompt_groups(
        {"person": ["person", "people"]}, ["background", "person", "potted_plant"]
    )
    assert flat == ("background", "person", "people", "potted plant")
    assert groups == {
        "background": ["background"],
        "person": ["person", "people"],
        "potted_plant": ["potted plant"],
    }
    with pytest.raises(UserError, match="used for both"):
        prompt_groups({"person": ["cat"]}, ["cat", "person"])
    with pytest.raises(UserError, match="'dog' is not a dataset class"):
        prompt_groups({"dog": ["dog"]}, ["cat"])


def test_prompt_channels_leave_the_background_to_the_models_none_channel():
    from annotate.vocab import prompt_channels

    classes = ["cat", "background", "dog"]
    channels, groups = prompt_channels({"dog": ["dog", "puppy"]}, classes, 1, "<none>")
    assert channels == ("cat", "<none>", "dog", "puppy")
    assert groups == {"cat": ["cat"], "background": ["<none>"], "dog": ["dog", "puppy"]}
    channels, groups = prompt_channels({"background": ["sky"]}, classes, 1, "<none>")
    assert channels == ("cat", "sky", "<none>", "dog")
    assert groups["background"] == ["sky", "<none>"]
    channels, _ = prompt_channels({}, ["cat", "dog"], None, "<none>")
    assert channels == ("cat", "dog")
    with pytest.raises(UserError, match="'<NONE>' .*is the name of the annotator's own"):
        prompt_channels({"cat": ["<NONE>"]}, classes, 1, "<none>")
