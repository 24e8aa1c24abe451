"""Identical images in a dataset: the owner of the manifest's ``label_conflicts`` and ``duplicates``
(``manifest.json``, written by :func:`cars_tl.data.manifest.build_manifest`).

Identical images with different labels (byte-identical files, within a split or across splits) are
a known flaw of the official data (11 such pairs in its training split). They are accepted and
listed under ``label_conflicts`` (policy ``keep``, the default: numbers stay comparable with
published ones), or every member of each such group is left out of the manifest (policy ``drop``,
``cars-tl download --label-conflicts drop``: recorded in ``origin``; the fingerprint changes).

``label_conflicts``
    ``policy``; ``groups``, ``within_split``, ``across_splits``, ``images`` (counts); ``dropped``
    (images left out by ``drop``); what ``drop`` emptied (``classes_without_train``,
    ``empty_splits``, when anything was); ``list``: one entry per group (:func:`find_conflicts`).
``duplicates``
    identical images with the same label: ``across_splits`` (train/test pairs, a leak) with
    ``across_splits_examples``, and ``within_splits_same_label`` (:func:`same_label_duplicates`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cars_tl.core.errors import CarsTLError, listed
from cars_tl.data.devkit import SPLITS

if TYPE_CHECKING:
    from cars_tl.data.manifest import Record

POLICIES = ("keep", "drop")  # identical images with different labels: listed, or left out


def check_label_conflicts(policy: str) -> str:
    if policy not in POLICIES:
        raise CarsTLError(
            f"--label-conflicts {policy!r} is not a policy; valid: {', '.join(POLICIES)} "
            "(keep lists identical images with different labels, drop leaves them out)",
            "cars-tl download --label-conflicts keep   (or drop)",
        )
    return policy


def find_conflicts(records: Sequence[Record], shown: Callable[[str], str]) -> list[dict]:
    """Groups of byte-identical images (same SHA-256) carrying more than one label, in manifest order.

    ``within_split``: two labels inside one split; ``across_splits``: a test image whose label
    differs from a train image's. ``source`` names the file the image was imported from.
    """
    by_digest: dict[str, list[Record]] = {}
    for r in records:
        by_digest.setdefault(r.sha256, []).append(r)
    groups = []
    for digest, group in by_digest.items():
        if len({r.label for r in group}) < 2:
            continue
        train_labels = {r.label for r in group if r.split == "train"}
        groups.append(
            {
                "sha256": digest,
                "within_split": any(len({r.label for r in group if r.split == s}) > 1 for s in SPLITS),
                "across_splits": any(r.split == "test" and train_labels - {r.label} for r in group),
                "images": [
                    {"path": r.path, "split": r.split, "label": r.label, "class_name": r.class_name}
                    | ({"source": shown(r.path)} if shown(r.path) != r.path else {})
                    for r in group
                ],
            }
        )
    return groups


def drop_losses(before: Sequence[Record], after: Sequence[Record], class_names, splits) -> dict:
    """What dropping emptied: classes left without a training image, splits left without any image."""
    trained = {r.label for r in after if r.split == "train"}
    lost = sorted({r.label for r in before if r.split == "train"} - trained)
    emptied = [s for s in splits if any(r.split == s for r in before) and not any(r.split == s for r in after)]
    return ({"classes_without_train": [class_names[i] for i in lost]} if lost else {}) | (
        {"empty_splits": emptied} if emptied else {}
    )


def drop_warning(info: dict | None) -> str | None:
    """The warning about what ``--label-conflicts drop`` emptied (None when nothing was)."""
    info = info if isinstance(info, dict) else {}
    lost, emptied = info.get("classes_without_train") or [], info.get("empty_splits") or []
    if not lost and not emptied:
        return None
    parts = []
    if lost:
        parts.append(f"{len(lost)} class{'es' if len(lost) > 1 else ''} without a training image ({listed(lost)})")
    if emptied:
        parts.append(f"the {' and '.join(emptied)} split{'s' if len(emptied) > 1 else ''} without any image")
    return (
        f"warning: --label-conflicts drop left {' and '.join(parts)}; models cannot learn (or be tested on) "
        "what is gone: import with --label-conflicts keep, or fix the source's duplicate files"
    )


def same_label_duplicates(records: Sequence[Record], splits: Sequence[str]) -> tuple[int, list[tuple[Record, Record]]]:
    """Identical images with the same label: extra copies within a split, and (train, test) pairs (a leak)."""
    by_digest: dict[str, list[Record]] = {}
    for r in records:
        by_digest.setdefault(r.sha256, []).append(r)
    within, across = 0, []
    for group in by_digest.values():
        for split in splits:
            labels = [r.label for r in group if r.split == split]
            within += len(labels) - len(set(labels))
        if "test" in splits:
            train: dict[int, Record] = {}
            for r in group:
                if r.split == "train":
                    train.setdefault(r.label, r)
            across += [(train[r.label], r) for r in group if r.split == "test" and r.label in train]
    return within, across


def describe_label_conflicts(info: dict | None, limit: int | None = 5) -> list[str]:
    """Lines about the ``label_conflicts`` of a manifest.json: a count, then one line per group."""
    if not isinstance(info, dict) or not info.get("groups"):
        return []
    groups = info.get("list") or []
    fate = (
        f"dropped: {info.get('dropped', 0)} images left out of the manifest"
        if info.get("policy") == "drop"
        else "kept, as in the official data and published results"
    )
    lines = [
        f"{info['groups']} groups of identical images with different labels (label noise; "
        f"{info.get('within_split', 0)} within a split, {info.get('across_splits', 0)} across splits; {fate})"
    ]
    for g in groups[:limit] if limit is not None else groups:
        lines.append(" = ".join(f"{i['split']} {i['path']} ({i['class_name']})" for i in g.get("images", [])))
    if limit is not None and len(groups) > limit:
        lines.append(f"... {len(groups) - limit} more (manifest.json, label_conflicts)")
    return lines


def manifest_fields(
    policy: str, conflicts: list[dict], dropped: int, losses: dict, within_splits: int, across: list
) -> dict:
    """The ``duplicates`` and ``label_conflicts`` entries of ``manifest.json``."""
    return {
        "duplicates": {
            "across_splits": len(across),
            "across_splits_examples": [[a.path, b.path] for a, b in across[:10]],
            "within_splits_same_label": within_splits,
        },
        "label_conflicts": {
            "policy": policy,
            "groups": len(conflicts),
            "within_split": sum(g["within_split"] for g in conflicts),
            "across_splits": sum(g["across_splits"] for g in conflicts),
            "images": sum(len(g["images"]) for g in conflicts),
            "dropped": dropped,
            **losses,
            "list": conflicts,
        },
    }
