"""Vocabulary mapping: an annotator's classes onto the dataset's classes.

An annotator rarely speaks the dataset's vocabulary (SEEM's COCO-133, a SegFormer's ADE-150, or
several prompt synonyms per class). A :class:`Vocabulary` maps each dataset class to a list of
annotator classes; their probabilities are summed (many-to-one). Annotator classes that no
dataset class takes are handled by ``unmapped``:

- ``"error"``: refuse to run (every annotator class must be mapped);
- ``"drop"``: their mass is discarded and the rest renormalised per pixel;
- ``"background"``: their mass goes to the dataset's background class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_manifest.errors import UserError

UNMAPPED = ("error", "drop", "background")


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


@dataclass(frozen=True)
class Vocabulary:
    """How annotator channels become dataset channels.

    Attributes:
        source: the annotator's class names (its output channels, in order).
        target: the dataset's class names.
        groups: for each target class, the indices of the source classes summed into it.
        unmapped: "error", "drop" or "background" (see the module docstring).
        background_index: the dataset's background class (needed for unmapped="background").
    """

    source: tuple[str, ...]
    target: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    unmapped: str = "error"
    background_index: int | None = None

    @property
    def identity(self) -> bool:
        """True when channels pass through unchanged (same classes in the same order)."""
        return len(self.source) == len(self.target) and all(
            g == (i,) for i, g in enumerate(self.groups)
        )

    @property
    def unmapped_indices(self) -> tuple[int, ...]:
        used = {i for g in self.groups for i in g}
        return tuple(i for i in range(len(self.source)) if i not in used)

    def output_normalization(self, normalization: str) -> str:
        """How the mapped scores become probabilities, given the annotator's normalization."""
        if self.identity:
            return normalization
        return "sum" if self.unmapped == "drop" and self.unmapped_indices else "probs"

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (for the cache metadata and the report)."""
        return {
            "unmapped": self.unmapped,
            "map": {
                t: [self.source[i] for i in g]
                for t, g in zip(self.target, self.groups, strict=True)
            },
            "unmapped_classes": [self.source[i] for i in self.unmapped_indices],
        }

    def apply(self, scores: Any, normalization: str) -> Any:
        """Map annotator scores to dataset scores.

        Args:
            scores: float (B, len(source), h, w), a torch tensor or a numpy array.
            normalization: how ``scores`` become probabilities ("softmax", "sum", "probs").
        Returns:
            The same kind of array, (B, len(target), h, w): ``scores`` unchanged when the
            mapping is the identity, else probabilities summed per group (normalization given
            by :meth:`output_normalization`).
        """
        if self.identity:
            return scores
        is_np = isinstance(scores, np.ndarray)
        if is_np:
            import torch

            scores = torch.from_numpy(scores)
        p = probabilities(scores.float(), normalization)
        out = scores.new_zeros((p.shape[0], len(self.target), *p.shape[2:]), dtype=p.dtype)
        for t, g in enumerate(self.groups):
            if g:
                out[:, t] = p[:, list(g)].sum(dim=1)
        rest = self.unmapped_indices
        if rest and self.unmapped == "background":
            out[:, self.background_index] += p[:, list(rest)].sum(dim=1)
        return out.numpy() if is_np else out


def probabilities(scores: Any, normalization: str) -> Any:
    """Torch version of :func:`annotate.cache.to_probs` over axis 1 of (B, K, h, w)."""
    import torch

    if normalization == "softmax":
        return torch.softmax(scores, dim=1)
    s = scores.clamp_min(0.0)
    total = s.sum(dim=1, keepdim=True)
    uniform = torch.full_like(s, 1.0 / s.shape[1])
    return torch.where(
        total > 0, s / torch.where(total > 0, total, torch.ones_like(total)), uniform
    )


def build_vocabulary(
    source: Sequence[str],
    target: Sequence[str],
    mapping: Mapping[str, Sequence[str]] | None = None,
    unmapped: str = "error",
    background_index: int | None = None,
    where: str = "[annotate] vocabulary",
) -> Vocabulary:
    """Build the mapping from annotator classes ``source`` to dataset classes ``target``.

    Every dataset class takes the annotator classes listed for it in ``mapping``; a dataset
    class not listed takes the annotator class of the same name (compared case-insensitively,
    with ``_``/``-`` as spaces). An empty list maps nothing to it (probability 0).

    Raises:
        UserError: a name that is not a class, a dataset class with no annotator class, an
            annotator class mapped twice, or unmapped classes under ``unmapped = "error"``.
    """
    if unmapped not in UNMAPPED:
        raise UserError(f"{where}: unmapped = {unmapped!r}; expected one of {', '.join(UNMAPPED)}")
    mapping = dict(mapping or {})
    by_name: dict[str, int] = {}
    for i, s in enumerate(source):
        by_name.setdefault(_norm(s), i)
    for t in mapping:
        if t not in target:
            raise UserError(
                f"{where}: {t!r} is not a dataset class; expected one of {', '.join(target)}"
            )
    groups: list[tuple[int, ...]] = []
    owner: dict[int, str] = {}
    for t in target:
        if t in mapping:
            idx = []
            for s in mapping[t]:
                if _norm(s) not in by_name:
                    raise UserError(
                        f"{where}: {t} = [... {s!r} ...]: {s!r} is not an annotator "
                        f"class; the annotator has {_preview(source)}"
                    )
                idx.append(by_name[_norm(s)])
        elif _norm(t) in by_name:
            idx = [by_name[_norm(t)]]
        else:
            raise UserError(
                f"{where}: dataset class {t!r} has no annotator class of that name; "
                f"expected an entry {t!r} = [annotator classes] (the annotator has "
                f"{_preview(source)})"
            )
        for i in idx:
            if i in owner and owner[i] != t:
                raise UserError(
                    f"{where}: annotator class {source[i]!r} is mapped to both "
                    f"{owner[i]!r} and {t!r}; expected at most one dataset class"
                )
            owner[i] = t
        groups.append(tuple(dict.fromkeys(idx)))
    vocab = Vocabulary(tuple(source), tuple(target), tuple(groups), unmapped, background_index)
    rest = vocab.unmapped_indices
    if rest and unmapped == "error":
        raise UserError(
            f"{where}: annotator classes {_preview([source[i] for i in rest])} are "
            'not mapped to any dataset class; map them, or set unmapped = "drop" '
            'or "background"'
        )
    if rest and unmapped == "background" and background_index is None:
        raise UserError(
            f'{where}: unmapped = "background" but the dataset has no background '
            'class (meta.background_index is null); expected "drop" or "error"'
        )
    return vocab


def _preview(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in list(names)[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)} classes)"


def prompt_groups(
    prompts: Mapping[str, Sequence[str]],
    classes: Sequence[str],
    where: str = "[annotate] prompts",
    unprompted: str | None = None,
) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """Text prompts for prompt-based annotators (SEEM, CLIPSeg).

    Each dataset class is prompted with its synonyms from ``prompts`` (default: its own name,
    with ``_``/``-`` as spaces); the synonyms' probabilities are later summed into the class.
    The class ``unprompted`` (the background class, which these annotators score from their
    own "nothing here" output) gets no default prompt: only the synonyms listed for it, if any.

    Returns:
        (the flat list of distinct prompts, in class order; dataset class -> its prompts).
    Raises:
        UserError: a key that is not a dataset class, an empty list, or a prompt used by two
            classes.
    """
    for c in prompts:
        if c not in classes:
            raise UserError(
                f"{where}: {c!r} is not a dataset class; expected one of {', '.join(classes)}"
            )
    flat: list[str] = []
    owner: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for c in classes:
        default = [] if c == unprompted else [c.replace("_", " ").replace("-", " ")]
        words = list(prompts.get(c, default))
        if not words and c != unprompted:
            raise UserError(f"{where}: {c} = []; expected at least one prompt")
        for w in words:
            if _norm(w) in owner and owner[_norm(w)] != c:
                raise UserError(
                    f"{where}: prompt {w!r} is used for both {owner[_norm(w)]!r} and "
                    f"{c!r}; expected each prompt once"
                )
            if _norm(w) not in owner:
                flat.append(w)
            owner[_norm(w)] = c
        groups[c] = words
    return tuple(flat), groups


def prompt_channels(
    prompts: Mapping[str, Sequence[str]],
    classes: Sequence[str],
    background_index: int | None,
    none_channel: str,
    where: str = "[annotate] prompts",
) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """Output channels of a prompt-based annotator that scores "none of the prompts" itself.

    The background class (if the dataset has one) is not prompted by default; it takes the
    annotator's ``none_channel`` (SEEM's no-object column, CLIPSeg's "no prompt present"),
    plus any synonyms listed for it in ``prompts``. Channels are in dataset class order, so
    that with one prompt per class the vocabulary is the identity.

    Returns:
        (channel names: the prompts, with ``none_channel`` at the background class's place;
        dataset class -> its channels).
    Raises:
        UserError: as :func:`prompt_groups`, or a prompt spelled like ``none_channel``.
    """
    bg = None if background_index is None else classes[background_index]
    _, groups = prompt_groups(prompts, classes, where, unprompted=bg)
    for c, words in groups.items():
        for w in words:
            if _norm(w) == _norm(none_channel):
                raise UserError(
                    f"{where}: {c} = [... {w!r} ...]: {none_channel!r} is the name of the "
                    "annotator's own no-prompt channel; expected another prompt"
                )
    if bg is not None:
        groups[bg] = [*groups[bg], none_channel]
    seen: set[str] = set()
    channels: list[str] = []
    for c in classes:
        for w in groups[c]:
            if _norm(w) not in seen:
                seen.add(_norm(w))
                channels.append(w)
    return tuple(channels), groups
