"""What lets a pipeline run resume: the chain of stage hashes, content fingerprints and stage markers.

A stage is skipped on ``--resume`` when its ``stage.json`` carries the same chain hash: the model file's and the
data's content, the seed, and every stage's settings up to it, hashed in order. Stage models are stored relative to
their stage folder, so a moved run folder still resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

__all__ = ["chain", "finished", "stage_model", "content_fingerprint", "data_fingerprint", "started"]


def chain(prev: str, settings: dict) -> str:
    """Hash of a stage's settings chained to the earlier stages'."""
    text = prev + json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished(stage_dir: str, chain: str) -> Optional[dict]:
    try:
        with open(os.path.join(stage_dir, "stage.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if info.get("chain") != chain:
        return None
    path = stage_model(stage_dir, info)
    return info if path and os.path.exists(path) else None


def stage_model(stage_dir: str, info: dict) -> Optional[str]:
    """The model a finished stage wrote; stored relative to its folder, so a moved run folder still resumes."""
    if info.get("model_file"):
        return os.path.join(stage_dir, info["model_file"])
    return info.get("model_path")  # written before model_file existed: relative to the working directory


def content_fingerprint(path: str) -> str:
    """A hash of a file's or folder's bytes (a SavedModel folder: every file, with its relative name)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
    for name in files:
        h.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def data_fingerprint(splits) -> dict:
    return {name: src.fingerprint() for name in ("train", "val", "test") if (src := getattr(splits, name)) is not None}


def started(stage_dir: str, chain: str) -> bool:
    """Marks a stage as started with these settings; True when an interrupted run of the same settings left work
    there (the distill stage's checkpoints) that can be continued, False when that work is stale."""
    path = os.path.join(stage_dir, "started.json")
    try:
        with open(path, encoding="utf-8") as f:
            same = json.load(f).get("chain") == chain
    except (OSError, ValueError):
        same = False
    from kcompress.io import write_json

    write_json(path, {"chain": chain, "started": time.time()}, overwrite=True)
    return same
