"""Small JPEG thumbnails of the manifest's images for the HTML report, as data URIs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.data import manifest as manifests
from cars_tl.data.images import crop_box, open_image

THUMB_PX = 96  # a confusion pair's thumbnails
GALLERY_PX = 150  # a gallery card's photo


class Thumbnails:
    """Small JPEG thumbnails of manifest images, as data URIs; empty when no matching manifest."""

    def __init__(self, data_dir: Path | None, fingerprints: set[str]):
        self.manifest, self.note, self._cache = None, "", {}
        if data_dir is None:
            self.note = "no --data-dir given: no thumbnails"
            return
        try:
            manifest = manifests.load_manifest(Path(data_dir))
        except CarsTLError as exc:
            self.note = f"no thumbnails: {exc.message}"
            return
        if fingerprints and manifest.fingerprint not in fingerprints:
            self.note = (
                f"no thumbnails: the manifest in {data_dir} is not the dataset the runs used (fingerprint differs)"
            )
            return
        self.manifest = manifest
        self.records = {r.index: r for r in manifest.records}
        self.first_train = {}
        for r in manifest.records:
            if r.split == "train":
                self.first_train.setdefault(r.label, r.index)

    def of(self, image_id: int | None, size: int = THUMB_PX, box: bool = True) -> str | None:
        if self.manifest is None or image_id is None or image_id not in self.records:
            return None
        key = (image_id, size, box)
        if key not in self._cache:
            record = self.records[image_id]
            try:
                image = open_image(self.manifest.root / record.path)
                if box:
                    image = crop_box(image, record.box, 0.05)
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=72)
                self._cache[key] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
            except Exception:  # a missing or bad image leaves a blank, never a broken page
                self._cache[key] = None
        return self._cache[key]

    def of_class(self, label: int) -> str | None:
        return self.of(self.first_train.get(label)) if self.manifest is not None else None
