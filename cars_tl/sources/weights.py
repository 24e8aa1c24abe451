"""torchvision ImageNet weights into the torch hub cache: :func:`download_weights`.

torch and torchvision are imported only inside :func:`download_weights`, so importing this module stays light.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from cars_tl.core.errors import CarsTLError
from cars_tl.core.progress import NULL, Progress
from cars_tl.sources.http import DownloadError, download_file
from cars_tl.sources.mirrors import check_mirror_urls

_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's convention: resnet50-11ad3fa6.pth
_WELL_KNOWN_MODELS = (
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "convnext_tiny",
    "mobilenet_v3_large",
    "regnet_y_800mf",
    "swin_t",
    "vit_b_16",
)


def download_weights(
    model_name: str, *, variant: str | None = None, mirrors: Sequence[str] = (), progress: Progress = NULL
) -> Path:
    """Fetch ImageNet weights of a torchvision classification model into the hub cache.

    ``model_name`` may name the weights enum too (``resnet50:IMAGENET1K_V1``), or ``variant`` does;
    without either, the model's DEFAULT weights. The file lands where torch.hub looks
    (``$TORCH_HOME/hub/checkpoints``), checked against the SHA-256 prefix in its name.
    ``mirrors`` (base URLs) are tried before the official URL.
    """
    import torch.hub
    import torchvision.models

    check_mirror_urls(mirrors)
    if ":" in model_name:
        model_name, named = model_name.split(":", 1)
        if variant and variant != named:
            raise CarsTLError(
                f"--weights {model_name}:{named} and --variant {variant} disagree",
                f"cars-tl download --weights {model_name}:{named}",
            )
        variant = named
    valid = torchvision.models.list_models(module=torchvision.models)
    if model_name.lower() not in valid:
        examples = [n for n in _WELL_KNOWN_MODELS if n in valid] or valid[:8]
        raise CarsTLError(
            f"unknown torchvision classification model {model_name!r}; valid names include "
            f"{', '.join(examples)} ({len(valid)} in all, see torchvision.models.list_models())",
            "cars-tl download --weights resnet50",
        )
    enum = torchvision.models.get_model_weights(model_name.lower())
    if variant in (None, "", "DEFAULT", "imagenet"):
        chosen = enum.DEFAULT
    else:
        try:
            chosen = enum[variant]
        except KeyError:
            names = [w.name for w in enum]
            raise CarsTLError(
                f"{model_name} has no weights {variant!r}; valid: {', '.join(names)} (DEFAULT is {enum.DEFAULT.name})",
                f"cars-tl download --weights {model_name}:{names[0]}",
            ) from None
    url = chosen.url
    filename = os.path.basename(urllib.parse.urlsplit(url).path)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if dest.is_file():
        return dest
    match = _HASH_IN_NAME.search(filename)
    prefix = match.group(1) if match and match.group(1) else None
    failures = []
    for candidate in [f"{m.rstrip('/')}/{filename}" for m in mirrors] + [url]:
        try:
            return download_file(candidate, dest, sha256_prefix=prefix, progress=progress)
        except DownloadError as exc:
            failures.append(f"  {candidate}: {exc.reason}")
    raise CarsTLError(
        f"could not download the {model_name} weights {chosen.name} ({filename}):\n" + "\n".join(failures),
        f"download {url} by hand and place it at {dest} (torch.hub's cache; set TORCH_HOME to move it), "
        f"or pass --mirror URL of a folder holding {filename}",
    )
